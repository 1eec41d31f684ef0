"""Build configuration beyond pyproject.toml: the optional C accelerator for `.metadata`."""

from setuptools import setup

setup()
