"""Reading raw text files (plain or gzip) into memory with precise errors."""

from __future__ import annotations

import zlib
from pathlib import Path

from seqrank.data.errors import BadLines, DataError

GZIP_MAGIC = b"\x1f\x8b"


def read_bytes(path: Path, bad: BadLines) -> bytes:
    """Whole file contents, gunzipped when the file is gzip (by magic bytes, not by name).

    A truncated gzip stream is a bad input: with `on_bad_line=skip` the complete lines are
    kept and the cut last line is dropped and counted.
    """
    raw = path.read_bytes()
    if not raw.startswith(GZIP_MAGIC):
        return raw
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(raw)
    except zlib.error as e:
        raise DataError(f"{path}: corrupt gzip stream ({e})") from None
    if not d.eof:
        nl = out.rfind(b"\n")
        complete = out[: nl + 1] if nl >= 0 else b""
        line = complete.count(b"\n") + 1
        bad.bad(path, line, "truncated gzip file: the stream ends inside this line")
        return complete
    return out


def decode_line(path: Path, lineno: int, line: bytes, bad: BadLines) -> str | None:
    """UTF-8 text of one line, or None (counted) when it is not valid UTF-8 under `skip`."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        bad.bad(path, lineno, f"not valid UTF-8 ({e.reason} at byte {e.start})")
        return None
