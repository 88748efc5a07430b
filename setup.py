"""Build: the Python packages always; the CUDA extension megakernel._C only where it can be built.

Metadata and dependencies are in pyproject.toml. Sources and flags come from
megakernel/_build.py, loaded by path (torch-free; the package itself is not imported).
The extension needs a CUDA build of torch importable at build time, so install with
`pip install --no-build-isolation .` on a GPU machine; elsewhere the install is pure Python
and says once why.
"""
import importlib.util
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


def load_build_facts():
    spec = importlib.util.spec_from_file_location(
        "_megakernel_build", os.path.join(ROOT, "megakernel", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_args():
    """(setup kwargs for the extension, None) or ({}, reason it is not built)."""
    build = load_build_facts()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return {}, ("torch is not importable in the build environment (on a GPU machine use "
                    "`pip install --no-build-isolation`)")
    if not torch.version.cuda:
        return {}, f"torch {torch.__version__} is a CPU-only build"
    if cpp_extension.CUDA_HOME is None:
        return {}, "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    missing = [s for s in build.SOURCES if not os.path.isfile(os.path.join(ROOT, s))]
    if missing:
        return {}, f"sources missing: {', '.join(missing)}"
    ext = cpp_extension.CUDAExtension(
        name="megakernel._C", sources=build.SOURCES,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": build.CXX_FLAGS, "nvcc": build.NVCC_FLAGS})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}, None


kwargs, reason = extension_args()
# pip runs setup.py once per build hook; say it in the one that builds.
if reason and BUILD_COMMANDS & set(sys.argv[1:]):
    print(f"megakernel: CUDA extension not built: {reason}; installing pure Python")

setup(
    packages=["megakernel", "megakernel.scheduler", "megakernel.bench"],
    package_dir={"megakernel": "megakernel", "megakernel.scheduler": "scheduler",
                 "megakernel.bench": "bench"},
    **kwargs,
)
