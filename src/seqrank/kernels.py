"""seqrank's C++ CPU kernels (`csrc/`), built on first use.

- `attention` (`csrc/attention.cpp`): fused multi-head attention, forward and backward
  (`models/layers/attention.py`). `SEQRANK_FUSED_ATTENTION=0` turns it off.
- `adam` (`csrc/adam.cpp`): dense Adam over an embedding table from its row-sparse gradient
  (`optim.Adam`). `SEQRANK_FUSED_ADAM=0` turns it off.

`load(name)` compiles the source with `torch.utils.cpp_extension.load` (the system's C++
compiler and the `ninja` wheel, a dependency; ~35 s for attention, ~15 s for adam, once per
machine, then loaded from the cache in well under a second) and returns the module, or None when
it is switched off or cannot be built - then the caller runs its torch fallback (the reference
the kernel is tested against), with one warning saying why. Builds are tuned for the building
CPU (`-march=native`), so the cache directory is keyed by the CPU's model and flags, the torch
version and the source (its text and its path): a home directory shared by different machines
never loads a binary built for another CPU, and two checkouts do not rebuild each other's.

Environment:
    SEQRANK_FUSED_ATTENTION, SEQRANK_FUSED_ADAM: "0" turns that kernel off (default on).
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

CSRC = Path(__file__).with_name("csrc")
# name: (source, the environment variable that turns it off, what falls back when it is off)
KERNELS = {
    "attention": (
        "attention.cpp",
        "SEQRANK_FUSED_ATTENTION",
        "attention runs through the slower Python kernels",
    ),
    "adam": ("adam.cpp", "SEQRANK_FUSED_ADAM", "Adam densifies sparse embedding gradients"),
}
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]  # sqrt vectorises; at::parallel_for
_state: dict[str, ModuleType | None] = {}


def _spec(name: str) -> tuple[Path, str, str]:
    if name not in KERNELS:
        raise ValueError(f"no kernel {name!r}; the kernels are {sorted(KERNELS)}")
    source, env, fallback = KERNELS[name]
    return CSRC / source, env, fallback


def enabled(name: str = "attention") -> bool:
    """Whether kernel `name` may be used (its environment variable is not "0"); called on every
    attention call, so no path is built here."""
    if name not in KERNELS:
        _spec(name)  # raises, naming the kernels
    return os.environ.get(KERNELS[name][1], "1") != "0"


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


def build_dir(name: str = "attention") -> Path:
    """The cache directory of this machine's build of kernel `name`'s source with this torch
    (and this checkout: ninja rebuilds a directory whose recorded source path changed, so two
    checkouts of the same source would rebuild each other's kernel on every switch)."""
    source = _spec(name)[0]
    parts = [
        _cpu_id(),
        torch.__version__,
        " ".join(FLAGS),
        str(source.resolve()),
        source.read_text(),
    ]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    root = os.environ.get("SEQRANK_EXTENSIONS_DIR") or Path.home() / ".cache/seqrank/extensions"
    return Path(root) / f"{name}-{key}"


def load(name: str = "attention") -> ModuleType | None:
    """Kernel `name`, built or loaded once per process; None when off or unavailable."""
    if not enabled(name):
        return None
    if name not in _state:
        _state[name] = _build(name)
    return _state[name]


def kernel() -> ModuleType | None:
    """The fused attention kernel (`load("attention")`)."""
    return load("attention")


def _build(name: str) -> ModuleType | None:
    from torch.utils import cpp_extension

    source, env, fallback = _spec(name)
    directory = build_dir(name)
    # the `ninja` wheel's binary sits beside this interpreter, which need not be on PATH
    scripts = str(Path(sys.executable).parent)
    if scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([scripts, os.environ.get("PATH", "")])
    try:
        directory.mkdir(parents=True, exist_ok=True)
        log.info("seqrank %s kernel: loading (building on first use) in %s", name, directory)
        return cpp_extension.load(
            name=f"seqrank_{name}",
            sources=[str(source)],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            verbose=False,
        )
    except Exception as err:  # noqa: BLE001 - any build failure means: use the fallback
        last = str(err).strip().splitlines()[-1] if str(err).strip() else ""
        warnings.warn(
            f"seqrank: the {name} C++ kernel could not be built in {directory} "
            f"({type(err).__name__}: {last}); {fallback}. Needs g++ and ninja; "
            f"{env}=0 silences this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def main() -> None:
    """Build (or find) every kernel now, so that the first training run does not wait for them."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in KERNELS:
        if load(name) is not None:
            print(f"seqrank: {name} kernel ready in {build_dir(name)}")
        elif enabled(name):
            print(f"seqrank: {name} kernel not built; {KERNELS[name][2]}")


if __name__ == "__main__":
    main()
