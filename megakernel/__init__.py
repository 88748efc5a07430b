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


def _mount_source_packages() -> None:
    # In a source checkout (or an editable install) scheduler/ and bench/ sit beside
    # megakernel/; setup.py installs them as megakernel.scheduler and megakernel.bench.
    # Mount them under those names here too.
    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("scheduler", "bench"):
        full = f"megakernel.{name}"
        if os.path.isdir(os.path.join(here, name)) or full in sys.modules:
            continue
        src = os.path.join(os.path.dirname(here), name)
        init = os.path.join(src, "__init__.py")
        if os.path.isfile(init):
            spec = importlib.util.spec_from_file_location(
                full, init, submodule_search_locations=[src])
            module = importlib.util.module_from_spec(spec)
            sys.modules[full] = module
            spec.loader.exec_module(module)
            globals()[name] = module


_mount_source_packages()

# name -> module that defines it (imported on first attribute access).
_LAZY = {
    "Weights": ".weights",
    "LayerWeights": ".weights",
    "KVCache": ".kv_cache",
    "ReferenceModel": ".reference",
    "PackedWeights": ".packing",
    "pack_weights": ".packing",
    "add_wo_t": ".packing",
    "Buffers": ".buffers",
    "CpuInterpreter": ".cpu_interpreter",
    "Decoder": ".decoder",
    "Runtime": ".runtime",
    "plan": ".scheduler",
    "Program": ".scheduler",
    "TpProgram": ".scheduler",
}

__all__ = ["ModelConfig", "RopeScaling", "PRESETS", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'megakernel' has no attribute {name!r}")
