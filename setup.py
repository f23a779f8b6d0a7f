"""Install dfqvit; the top-level ``kernels/`` folder is installed as ``dfqvit.kernels``.

The PyPI name ``kernels`` belongs to another project, so the folder is never an importable
top-level package (see ARCHITECTURE.md).

The optional native extension ``dfqvit._C`` (``CMakeLists.txt``, sources in ``kernels/csrc/``) is built
with CMake + Ninja according to ``DFQVIT_BUILD_EXT``: ``1`` builds it and fails the install if that
fails, ``auto`` (default) tries and falls back to pure Python with a warning, ``0`` skips it. dfqvit works
without it; a plain ``pip install -e .[dev]`` never fails because of it. The build needs torch, so pass
``--no-build-isolation``: ``DFQVIT_BUILD_EXT=1 pip install -e . --no-build-isolation``.
"""
import os
import shutil
import subprocess
import sys
import warnings

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

packages = find_packages(include=["dfqvit", "dfqvit.*"]) + ["dfqvit.kernels"]

BUILD_EXT = os.environ.get("DFQVIT_BUILD_EXT", "auto").strip().lower()
if BUILD_EXT not in ("0", "1", "auto"):
    raise SystemExit(f"DFQVIT_BUILD_EXT={BUILD_EXT!r}; allowed: 0 (skip), 1 (required), auto (try, fall back).")
ROOT = os.path.dirname(os.path.abspath(__file__))


class CMakeExtension(Extension):
    """An extension whose build is delegated to CMakeLists.txt."""

    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extensions(self):
        for ext in list(self.extensions):
            try:
                self._build_with_cmake(ext)
            except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
                if BUILD_EXT == "1":
                    raise
                warnings.warn(f"dfqvit: the optional native extension {ext.name} was not built ({exc}); "
                              "dfqvit works without it. Set DFQVIT_BUILD_EXT=1 to make this an error, 0 to skip.")
                self.extensions.remove(ext)

    def _build_with_cmake(self, ext):
        for tool in ("cmake", "ninja"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} not found on PATH (pip install cmake ninja)")
        probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True)
        if probe.returncode != 0:
            raise RuntimeError("torch is not importable by the build's Python; pip's build isolation hides it, "
                               "so install with --no-build-isolation to build the extension")
        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        build_dir = os.path.join(os.path.abspath(self.build_temp), "cmake")
        os.makedirs(build_dir, exist_ok=True)
        subprocess.run(["cmake", "-S", ROOT, "-B", build_dir, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                        f"-DPython3_EXECUTABLE={sys.executable}", f"-DDFQVIT_EXT_OUTPUT_DIR={out_dir}"], check=True)
        subprocess.run(["cmake", "--build", build_dir], check=True)


setup(
    packages=packages,
    package_dir={"dfqvit.kernels": "kernels"},
    ext_modules=[] if BUILD_EXT == "0" else [CMakeExtension("dfqvit._C")],
    cmdclass={"build_ext": CMakeBuild},
)
