"""Errors and the bad-line policy shared by all raw readers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ON_BAD_LINE = ("error", "skip")


class DataError(Exception):
    """Raised for bad raw input; the message names the file, the line and what was expected."""


class MissingDataError(DataError):
    """Raised when raw files are absent; the message names the paths and the download command."""


@dataclass
class BadLines:
    """Applies `on_bad_line` and counts what was skipped.

    Args:
        policy: `error` raises at the first bad line; `skip` counts it and goes on.
    """

    policy: str = "error"
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.policy not in ON_BAD_LINE:
            raise ValueError(
                f"data.on_bad_line={self.policy!r}; expected one of {list(ON_BAD_LINE)}"
            )

    def bad(self, path: Path | str, line: int | None, reason: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        if self.policy == "error":
            raise DataError(
                f"{where}: {reason} (set data.on_bad_line=skip to skip and count such lines)"
            )
        key = str(Path(path).name)
        self.counts[key] = self.counts.get(key, 0) + 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {reason}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())
