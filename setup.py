"""Builds the Python package around the op library that CMakeLists.txt describes.

setup.py keeps no list of sources: it configures and builds the `linquant_ops` target with CMake
(in ./build, or $LINQUANT_BUILD_DIR) and ships the resulting shared library inside the package.
Build with `pip install --no-build-isolation .` so the library is compiled against the torch
that will load it. LINQUANT_CUDA, LINQUANT_CUDA_ARCHS and LINQUANT_CUTLASS_DIR pass through to CMake.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, target: str):
        super().__init__(name, sources=[])
        self.target = target


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        build_dir = Path(os.environ.get("LINQUANT_BUILD_DIR", ROOT / "build")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir),
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('LINQUANT_BUILD_TYPE', 'Release')}",
        ]
        if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
            configure += ["-G", "Ninja"]
        for var in ("LINQUANT_CUDA", "LINQUANT_CUDA_ARCHS", "LINQUANT_CUTLASS_DIR"):
            if var in os.environ:
                configure.append(f"-D{var}={os.environ[var]}")
        subprocess.run(configure, check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run(["cmake", "--build", str(build_dir), "--target", ext.target, "-j", jobs], check=True)
        built = build_dir / f"lib{ext.target}.so"
        dest = Path(self.get_ext_fullpath(ext.name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, dest)


setup(
    packages=["linquant"],
    package_dir={"": "python"},
    ext_modules=[CMakeExtension("linquant._linquant_ops", target="linquant_ops")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
