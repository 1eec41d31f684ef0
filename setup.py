"""Build configuration beyond pyproject.toml: the optional C accelerator for `.metadata`."""

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
    ],
)
