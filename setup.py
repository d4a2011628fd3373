"""Builds ringpool._core from the runtime and binding sources (no CMake needed for pip).

pip install --no-build-isolation .      # uses Debian's setuptools and pybind11
"""
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext = Pybind11Extension(
    "ringpool._core",
    sorted(glob("runtime/src/*.cpp")) + sorted(glob("bindings/src/*.cpp")),
    include_dirs=["runtime/include", "proto/include", "bindings/src"],
    cxx_std=20,
    extra_compile_args=["-O2"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
