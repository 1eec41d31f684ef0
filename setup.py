"""Build configuration beyond pyproject.toml: the optional C accelerators (`.metadata`, FP8)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # restricted scanner for DCP .metadata pickles (dcp_explorer/readers/_fast.py);
        # optional: without a compiler the pure-Python reader is used
        Extension(
            "dcp_explorer.readers._dcpscan",
            ["dcp_explorer/readers/_dcpscan.c"],
            optional=True,
        ),
        # FP8 block-scaled dequantization in one pass (dcp_explorer/quant.py); optional: without a
        # compiler numpy's take + multiply give the same bits, slower
        Extension("dcp_explorer._kernels", ["dcp_explorer/_kernels.c"], optional=True),
    ],
)
