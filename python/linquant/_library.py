"""Finds and loads the compiled op library, which registers `torch.ops.linquant.*`."""

import glob
import os

import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def library_path() -> str:
    """Path of the op library: $LINQUANT_LIBRARY if set, else the one installed in the package."""
    override = os.environ.get("LINQUANT_LIBRARY")
    if override:
        if not os.path.isfile(override):
            raise ImportError(f"linquant: LINQUANT_LIBRARY={override!r} is not a file")
        return override
    found = sorted(glob.glob(os.path.join(_PACKAGE_DIR, "_linquant_ops*.so")))
    if not found:
        raise ImportError(
            f"linquant: the compiled op library is missing from {_PACKAGE_DIR}; build and install the "
            "package with `pip install --no-build-isolation .` from the repository root"
        )
    return found[0]


def load_library() -> str:
    path = library_path()
    torch.ops.load_library(path)
    return path
