"""Build facts shared by setup.py and the JIT path: sources and flags. Torch-free."""
from __future__ import annotations

import hashlib
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
SOURCES = ["csrc/binding.cpp", "csrc/megakernel.cu", "csrc/megakernel_b1.cu"]
NVCC_FLAGS = ["-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-lineinfo",
              "--expt-relaxed-constexpr", "-Xptxas=-warn-spills"]
CXX_FLAGS = ["-O3", "-std=c++17"]
PROBES = os.path.join(CSRC, "probes")   # standalone programs, not part of the extension


def source_hash(extra_flags=()) -> str:
    """Hash of every extension file under csrc/ and the flags: the JIT cache key."""
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(CSRC)):
        if os.path.commonpath([dirpath, PROBES]) == PROBES:
            continue
        for f in sorted(files):
            if f.endswith((".cu", ".cuh", ".cpp", ".h")):
                p = os.path.join(dirpath, f)
                h.update(os.path.relpath(p, ROOT).encode())
                with open(p, "rb") as fh:
                    h.update(fh.read())
    h.update(" ".join(NVCC_FLAGS + CXX_FLAGS + list(extra_flags)).encode())
    return h.hexdigest()[:16]
