"""Test helpers for seqrank's C++ kernels (`seqrank/kernels.py`)."""

from __future__ import annotations

import os
import shutil
from types import ModuleType

import pytest

from seqrank import kernels


def require_kernel(name: str) -> ModuleType:
    """Kernel `name`; skips where there is no C++ compiler (ninja is a dependency) or the kernel
    is switched off by its environment variable, fails where there is a compiler but the kernel
    does not build."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip(f"no C++ compiler: the {name} kernel cannot be built")
    if not kernels.enabled(name):
        pytest.skip(f"{kernels.KERNELS[name][1]}=0")
    if kernels._state.get(name, ...) is None:
        del kernels._state[name]  # a fresh attempt: a cached failure would hide the reason
    ext = kernels.load(name)
    assert ext is not None, f"the {name} kernel did not build (see the warning)"
    return ext
