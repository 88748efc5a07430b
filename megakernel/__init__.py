"""megakernel: a Llama decode step as one persistent CUDA kernel.

Importing the package is cheap and torch-free: `megakernel.scheduler` and
`megakernel.ModelConfig` work without torch; the names that need torch load on first use.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from .config import ModelConfig, RopeScaling, PRESETS

__version__ = "0.1.0"


def _mount_source_scheduler() -> None:
    # In a source checkout (or an editable install) scheduler/ sits beside megakernel/;
    # setup.py installs it as megakernel.scheduler. Mount it under that name here too.
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(here, "scheduler")) or "megakernel.scheduler" in sys.modules:
        return
    src = os.path.join(os.path.dirname(here), "scheduler")
    init = os.path.join(src, "__init__.py")
    if os.path.isfile(init):
        spec = importlib.util.spec_from_file_location(
            "megakernel.scheduler", init, submodule_search_locations=[src])
        module = importlib.util.module_from_spec(spec)
        sys.modules["megakernel.scheduler"] = module
        spec.loader.exec_module(module)
        globals()["scheduler"] = module


_mount_source_scheduler()

# name -> module that defines it (imported on first attribute access).
_LAZY = {
    "Weights": ".weights",
    "LayerWeights": ".weights",
    "KVCache": ".kv_cache",
    "ReferenceModel": ".reference",
    "PackedWeights": ".packing",
    "pack_weights": ".packing",
    "Buffers": ".buffers",
    "CpuInterpreter": ".cpu_interpreter",
    "Decoder": ".decoder",
    "Runtime": ".runtime",
    "plan": ".scheduler",
    "Program": ".scheduler",
}

__all__ = ["ModelConfig", "RopeScaling", "PRESETS", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'megakernel' has no attribute {name!r}")
