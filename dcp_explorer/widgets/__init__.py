"""Notebook widgets (ipywidgets 8), thin over the library.

State lives in widget traits; behaviour is delegated to :mod:`dcp_explorer.plan`,
:mod:`dcp_explorer.tables`, :mod:`dcp_explorer.viz` and the loader.  Pictures are rendered to
PNG into ``widgets.Image`` and tables into ``widgets.HTML``, so every widget can be driven and
checked by setting traits, without a browser; errors from a callback are shown in the
widget's ``error`` area instead of being lost in the kernel log.
"""

from __future__ import annotations

from .browser import CheckpointBrowser
from .diff import DiffViewer
from .quant import QuantViewer
from .reshard import ReshardExplorer

__all__ = ["CheckpointBrowser", "ReshardExplorer", "QuantViewer", "DiffViewer"]
