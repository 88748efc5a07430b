"""NVTX ranges for Nsight Systems: real ranges when the `nvtx` package is installed
(`pip install -e ".[trace]"`), otherwise free no-ops, so callers never check."""
from __future__ import annotations

import contextlib

try:
    import nvtx as _nvtx
except ImportError:
    _nvtx = None


@contextlib.contextmanager
def nvtx_range(name: str, color: str = "blue"):
    """`with nvtx_range("step"):` or `@nvtx_range("step")` marks a range on the timeline."""
    if _nvtx is None:
        yield
        return
    with _nvtx.annotate(name, color=color):
        yield
