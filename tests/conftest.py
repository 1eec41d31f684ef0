"""Shared pytest fixtures."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import pytest


@pytest.fixture(scope="session")
def samples() -> dict[str, pathlib.Path]:
    """All sample checkpoints (name -> directory), built once and cached across runs.

    They live in :func:`dcp_explorer.samples.default_root`, which honours
    ``$DCP_EXPLORER_SAMPLES`` and is keyed by the samples version and the torch version.
    """
    pytest.importorskip("torch")
    from dcp_explorer.samples import make_samples

    return make_samples()


@pytest.fixture(scope="session")
def sample(samples: dict[str, pathlib.Path]) -> Callable[[str], pathlib.Path]:
    """Factory: ``sample("mixed")`` -> the directory of that sample checkpoint."""
    return samples.__getitem__


@pytest.fixture
def private_cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """``$DCP_EXPLORER_CACHE`` set to an empty directory of the test's own: the user's parse cache is
    never touched, and every test starts cold. A module uses it for all its tests with
    ``pytestmark = pytest.mark.usefixtures("private_cache")``."""
    cache = tmp_path / "dcpx-cache"
    monkeypatch.setenv("DCP_EXPLORER_CACHE", str(cache))
    return cache
