"""Builds ringpool._core from the runtime and binding sources (no CMake needed for pip).

pip install --no-build-isolation .      # uses Debian's setuptools and pybind11
"""
import os
from glob import glob

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup
from setuptools.command.build_py import build_py

# At the site-packages root, where site reads .pth files: makes the start-method name "ringpool"
# work in every interpreter (bindings/_ringpool_start_method.py).
START_METHOD_PTH = "bindings/ringpool-start-method.pth"


class build_py_with_pth(build_py):
    """build_py, plus the .pth at the root of the build tree (so at the root of the wheel):
    setuptools has no option for a file outside every package."""

    def run(self):
        super().run()
        self.copy_file(START_METHOD_PTH, os.path.join(self.build_lib, os.path.basename(START_METHOD_PTH)))

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [
            os.path.join(self.build_lib, os.path.basename(START_METHOD_PTH))]


ext = Pybind11Extension(
    "ringpool._core",
    sorted(glob("runtime/src/*.cpp")) + sorted(glob("bindings/src/*.cpp")),
    include_dirs=["runtime/include", "proto/include", "bindings/src"],
    cxx_std=20,
    extra_compile_args=["-O2"],
)

# The translation units compile in parallel, one job per CPU (RINGPOOL_BUILD_JOBS=N sets how many).
ParallelCompile("RINGPOOL_BUILD_JOBS").install()

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext, "build_py": build_py_with_pth})
