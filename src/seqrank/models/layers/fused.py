"""The fused CPU attention kernel (`csrc/attention.cpp`), built on first use.

`kernel()` compiles the C++ source with `torch.utils.cpp_extension.load` (the system's C++
compiler and the `ninja` wheel, a dependency; ~35 s once per machine, then loaded from the cache
in well under a second) and returns the module, or None when it is switched off (`SEQRANK_FUSED_ATTENTION=0`) or cannot be built - then attention
runs through the Python kernels of `attention.py`, with one warning saying why. The build is
tuned for the building CPU (`-march=native`), so the cache directory is keyed by the CPU's
model and flags, the torch version and the source: a home directory shared by different
machines never loads a binary built for another CPU.

Environment:
    SEQRANK_FUSED_ATTENTION: "0" turns the kernel off (default on).
    SEQRANK_EXTENSIONS_DIR: where builds are cached (default ~/.cache/seqrank/extensions).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "attention.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp"]  # OpenMP: at::parallel_for over (sample, head)
_state: dict[str, ModuleType | None] = {}


def enabled() -> bool:
    """Whether the fused kernel may be used (`SEQRANK_FUSED_ATTENTION` is not "0")."""
    return os.environ.get("SEQRANK_FUSED_ATTENTION", "1") != "0"


def _cpu_id() -> str:
    """The CPU's model and feature flags (what -march=native compiles for)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [
        line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))
    ]
    return "\n".join(sorted(set(keep)))


def build_dir() -> Path:
    """The cache directory of this machine's build of this source with this torch."""
    key = hashlib.sha256(
        "\0".join([_cpu_id(), torch.__version__, " ".join(FLAGS), SOURCE.read_text()]).encode()
    ).hexdigest()[:16]
    root = os.environ.get("SEQRANK_EXTENSIONS_DIR") or Path.home() / ".cache/seqrank/extensions"
    return Path(root) / f"attention-{key}"


def kernel() -> ModuleType | None:
    """The compiled kernel, built or loaded once per process; None when off or unavailable."""
    if not enabled():
        return None
    if "module" not in _state:
        _state["module"] = _load()
    return _state["module"]


def _load() -> ModuleType | None:
    from torch.utils import cpp_extension

    directory = build_dir()
    # the `ninja` wheel's binary sits beside this interpreter, which need not be on PATH
    scripts = str(Path(sys.executable).parent)
    if scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([scripts, os.environ.get("PATH", "")])
    try:
        directory.mkdir(parents=True, exist_ok=True)
        log.info("fused attention: loading (building on first use) in %s", directory)
        return cpp_extension.load(
            name="seqrank_fused_attention",
            sources=[str(SOURCE)],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            verbose=False,
        )
    except Exception as err:  # noqa: BLE001 - any build failure means: use the Python kernels
        warnings.warn(
            f"seqrank: the fused CPU attention kernel could not be built in {directory} "
            f"({type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}); "
            "attention runs through the slower Python kernels. Needs g++ and ninja; "
            "SEQRANK_FUSED_ATTENTION=0 silences this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def main() -> None:
    """Build (or find) the kernel now, so that the first training run does not wait for it."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if kernel() is not None:
        print(f"seqrank: fused CPU attention kernel ready in {build_dir()}")
    elif enabled():
        print("seqrank: fused CPU attention kernel not built; attention uses the Python kernels")

