"""Fetch the raw dataset files from their public URLs.

The registry (`REGISTRY`) maps a dataset name to the files it needs:

* ``electro``: Amazon 2014 (McAuley, UCSD) Electronics 5-core reviews and item meta.
* ``clothing``: Amazon 2014 Clothing, Shoes and Jewelry 5-core reviews and item meta.
* ``taobao``: Tianchi UserBehavior. It has no public direct URL (Tianchi needs a login),
  so it must be placed by hand; `download` raises `ManualDownloadRequired` with the
  instruction and the CLI prints it and exits with code 2.

Downloads stream with the standard library (`urllib`) into ``<dest>/<filename>.part``,
resume an existing ``.part`` with an HTTP ``Range`` request, retry cut connections, verify
the size (registry value, else the server's total) and the sha256 when the registry pins one,
and only then rename the ``.part`` to the final name with `os.replace`. The final name
therefore never holds a partial or unverified file.

The environment variable ``SEQRANK_MIRROR`` replaces the URL prefix (scheme, host and path
up to the filename) of every registry file, e.g.
``SEQRANK_MIRROR=https://mirror.example.org/amazon/``.

Usage::

    python -m seqrank.data.download electro [--dest DIR] [--no-progress]
    python -m seqrank.data.download --list
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

__all__ = [
    "MIRROR_ENV",
    "REGISTRY",
    "DatasetEntry",
    "DownloadError",
    "ManualDownloadRequired",
    "RemoteFile",
    "download",
    "download_file",
    "main",
    "resolve_files",
    "resolve_url",
]

MIRROR_ENV = "SEQRANK_MIRROR"
"""Environment variable whose value replaces the URL prefix up to the filename."""

AMAZON_2014_BASE = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
TIANCHI_USER_BEHAVIOR_PAGE = "https://tianchi.aliyun.com/dataset/649"

RETRY_BACKOFF_S = 1.0
"""Base of the exponential back-off between retries (seconds; doubled each retry, capped)."""
_MAX_BACKOFF_S = 30.0
_HASH_CHUNK = 1 << 20
_USER_AGENT = "seqrank-download/0.1 (+python-urllib)"


class DownloadError(RuntimeError):
    """A download failed: network errors after all retries, bad status, size or hash mismatch."""


class ManualDownloadRequired(DownloadError):
    """The dataset cannot be fetched automatically; the message tells the user what to do."""


class _RestartFromZero(Exception):
    """Internal: the partial file was discarded and the transfer must start over."""


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file.

    Attributes:
        url: full URL of the file.
        filename: name of the file written into the destination directory.
        size: expected size in bytes, or None if unknown (the server's total is used).
        sha256: expected lowercase hex sha256, or None if unknown (the computed one is printed).
    """

    url: str
    filename: str
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class DatasetEntry:
    """A registry entry: the files of one dataset and where they go by default.

    Attributes:
        description: one-line human description.
        default_dest: default destination directory, relative to the working directory.
        files: files that can be downloaded automatically.
        manual_files: files the user must place by hand (no public direct URL).
        homepage: page describing the dataset / where to get manual files.
        manual_instructions: what the user must do for `manual_files`, or None.
    """

    description: str
    default_dest: str
    files: tuple[RemoteFile, ...] = ()
    manual_files: tuple[str, ...] = ()
    homepage: str | None = None
    manual_instructions: str | None = None


# Sizes and checksums are left None on purpose: they are verified against the server's
# Content-Length, and the computed sha256 is printed so it can be pinned here later.
REGISTRY: dict[str, DatasetEntry] = {
    "electro": DatasetEntry(
        description="Amazon 2014 (McAuley, UCSD) Electronics: 5-core reviews + item meta",
        default_dest="data/raw/amazon",
        files=(
            RemoteFile(
                url=AMAZON_2014_BASE + "reviews_Electronics_5.json.gz",
                filename="reviews_Electronics_5.json.gz",
            ),
            RemoteFile(
                url=AMAZON_2014_BASE + "meta_Electronics.json.gz",
                filename="meta_Electronics.json.gz",
            ),
        ),
        homepage="https://jmcauley.ucsd.edu/data/amazon/",
    ),
    "clothing": DatasetEntry(
        description="Amazon 2014 (McAuley, UCSD) Clothing, Shoes and Jewelry: 5-core reviews + item meta",
        default_dest="data/raw/amazon",
        files=(
            RemoteFile(
                url=AMAZON_2014_BASE + "reviews_Clothing_Shoes_and_Jewelry_5.json.gz",
                filename="reviews_Clothing_Shoes_and_Jewelry_5.json.gz",
            ),
            RemoteFile(
                url=AMAZON_2014_BASE + "meta_Clothing_Shoes_and_Jewelry.json.gz",
                filename="meta_Clothing_Shoes_and_Jewelry.json.gz",
            ),
        ),
        homepage="https://jmcauley.ucsd.edu/data/amazon/",
    ),
    "taobao": DatasetEntry(
        description="Tianchi UserBehavior (Taobao user behaviour for recommendation)",
        default_dest="data/raw/taobao",
        manual_files=("UserBehavior.csv",),
        homepage=TIANCHI_USER_BEHAVIOR_PAGE,
        manual_instructions=(
            "Tianchi UserBehavior has no public direct download URL (Tianchi requires a login). "
            f"Log in at {TIANCHI_USER_BEHAVIOR_PAGE}, download UserBehavior.csv.zip, unzip it "
            "and place UserBehavior.csv manually into the target directory: {dest}"
        ),
    ),
}


def _console() -> Console:
    """Console for status messages (stderr, so stdout stays clean for `--list`)."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _say(message: str) -> None:
    _console().print(message, markup=False)


def resolve_url(url: str, mirror: str | None = None) -> str:
    """Apply the mirror prefix to a URL.

    Args:
        url: original URL.
        mirror: replacement prefix; if None, the value of ``SEQRANK_MIRROR`` is used.
            An empty value means no mirror.

    Returns:
        ``<mirror>/<last path segment of url>`` when a mirror is set, else ``url`` unchanged.
    """
    if mirror is None:
        mirror = os.environ.get(MIRROR_ENV, "")
    mirror = mirror.strip()
    if not mirror:
        return url
    basename = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return mirror.rstrip("/") + "/" + basename


def resolve_files(name: str) -> list[RemoteFile]:
    """The registry files of a dataset with ``SEQRANK_MIRROR`` applied (read at call time).

    Args:
        name: registry key.

    Returns:
        Copies of the entry's `RemoteFile` objects with mirrored URLs.

    Raises:
        KeyError: ``name`` is not in the registry.
    """
    entry = _entry(name)
    return [dataclasses.replace(f, url=resolve_url(f.url)) for f in entry.files]


def _entry(name: str) -> DatasetEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; choose from {sorted(REGISTRY)}") from None


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _present_and_valid(path: Path, remote: RemoteFile) -> bool:
    """Whether an existing final file matches the registry's size/checksum (when known).

    A final file is only ever created by a verified download (atomic rename), so with no
    expected values its presence alone counts as valid.
    """
    if not path.is_file():
        return False
    if remote.size is not None and path.stat().st_size != remote.size:
        return False
    return remote.sha256 is None or _sha256_of(path) == remote.sha256.lower()


_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)", re.IGNORECASE)


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """Parse ``Content-Range`` into (first byte, complete length); None where absent or ``*``."""
    if not value:
        return None, None
    match = _CONTENT_RANGE.match(value.strip())
    if not match:
        return None, None
    start = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(3)) if match.group(3) != "*" else None
    return start, total


def _content_length(headers: http.client.HTTPMessage) -> int | None:
    value = headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _is_transient(exc: BaseException) -> bool:
    """Whether an error is worth a retry (cut connection, timeout, 5xx/408/429)."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code in (408, 429)
    return isinstance(
        exc,
        http.client.IncompleteRead
        | ConnectionError
        | TimeoutError
        | urllib.error.URLError
        | http.client.BadStatusLine,
    )


class _ProgressSink:
    """Thin wrapper over an optional rich progress task."""

    def __init__(self, progress: Progress | None, task: TaskID | None) -> None:
        self._progress = progress
        self._task = task

    def reset(self, completed: int, total: int | None) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=completed, total=total)

    def advance(self, n: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)


@contextlib.contextmanager
def _progress_sink(enabled: bool, label: str) -> Iterator[_ProgressSink]:
    if not enabled:
        yield _ProgressSink(None, None)
        return
    progress = Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=_console(),
        transient=False,
    )
    with progress:
        yield _ProgressSink(progress, progress.add_task(label, total=None))


def _fetch_once(
    remote: RemoteFile, part: Path, *, chunk_size: int, timeout: float, sink: _ProgressSink
) -> int | None:
    """One HTTP request that appends to (or restarts) ``part`` until the body ends.

    Returns:
        The complete length of the remote file as announced by the server, or None.

    Raises:
        _RestartFromZero: the part was discarded; call again.
        http.client.IncompleteRead: the body ended before its announced length.
        urllib.error.URLError, OSError: network failures.
        DownloadError: an unexpected HTTP status.
    """
    offset = part.stat().st_size if part.exists() else 0
    if remote.size is not None and offset > remote.size:
        _say(
            f"{part.name}: partial file is larger than expected ({offset} > {remote.size}); restarting"
        )
        part.unlink()
        offset = 0

    request = urllib.request.Request(
        remote.url, headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    )
    if offset:
        request.add_header("Range", f"bytes={offset}-")

    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not offset:
            raise
        # Range not satisfiable: the part may already be complete.
        _, total = _parse_content_range(exc.headers.get("Content-Range") if exc.headers else None)
        exc.close()
        if total is None:
            total = remote.size
        if total is not None and offset == total:
            sink.reset(offset, total)
            return total
        _say(f"{part.name}: server rejected resume at byte {offset}; restarting from zero")
        part.unlink()
        raise _RestartFromZero from None

    with response:
        status = response.status
        length = _content_length(response.headers)
        if status == 206 and offset:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != offset:
                _say(
                    f"{part.name}: server resumed at byte {start}, not {offset}; restarting from zero"
                )
                part.unlink()
                raise _RestartFromZero
            if total is None and length is not None:
                total = offset + length
            mode = "ab"
        elif status == 200:
            if offset:
                _say(f"{part.name}: server ignored the Range request; restarting from zero")
            offset = 0
            total = length
            mode = "wb"
        else:
            raise DownloadError(
                f"{remote.filename}: unexpected HTTP status {status} from {remote.url}"
            )

        sink.reset(offset, total)
        with part.open(mode) as fh:
            received = _copy_body(response, fh, chunk_size=chunk_size, sink=sink)
        if length is not None and received < length:
            raise http.client.IncompleteRead(b"", length - received)
        return total


def _copy_body(
    response: http.client.HTTPResponse, fh: BinaryIO, *, chunk_size: int, sink: _ProgressSink
) -> int:
    """Copy a response body into ``fh`` chunk by chunk; flush so a cut keeps the bytes.

    Returns:
        Number of bytes copied.
    """
    received = 0
    while chunk := response.read(chunk_size):
        fh.write(chunk)
        fh.flush()
        received += len(chunk)
        sink.advance(len(chunk))
    return received


def download_file(
    remote: RemoteFile,
    dest_dir: Path,
    *,
    progress: bool = True,
    chunk_size: int = 1 << 20,
    timeout: float = 60,
    retries: int = 3,
) -> Path:
    """Download one file into ``dest_dir``, resuming and verifying; atomic on success.

    Bytes go to ``<dest_dir>/<filename>.part``. An existing ``.part`` is resumed with a
    ``Range`` request (a server answering 200 restarts from zero, 416 on a complete part is
    accepted). Cut connections and timeouts are retried ``retries`` times, each retry resuming.
    Then the size (``remote.size``, else the server's total) and the sha256 (if
    ``remote.sha256``) are checked and the ``.part`` is renamed with `os.replace`.

    Args:
        remote: what to fetch (its ``url`` is used as is; see `resolve_files` for mirrors).
        dest_dir: destination directory, created if missing.
        progress: show a rich progress bar (bytes, speed, ETA).
        chunk_size: read size in bytes.
        timeout: socket timeout in seconds for connect and each read.
        retries: extra attempts after a transient failure.

    Returns:
        Path of the final, verified file.

    Raises:
        DownloadError: the transfer failed after all retries (the ``.part`` is kept for a
            later resume), the server answered with an error, or size/sha256 did not match
            (the ``.part`` is deleted). The final file is never left partial.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / remote.filename
    part = dest_dir / f"{remote.filename}.part"

    if final.exists():
        if _present_and_valid(final, remote):
            _say(f"{remote.filename}: already present at {final}, skipping")
            return final
        _say(
            f"{remote.filename}: existing file does not match the expected size/sha256; re-downloading"
        )
        final.unlink()

    attempt = 0
    total: int | None = None
    with _progress_sink(progress, remote.filename) as sink:
        while True:
            try:
                total = _fetch_once(remote, part, chunk_size=chunk_size, timeout=timeout, sink=sink)
                break
            except _RestartFromZero:
                continue
            except DownloadError:
                raise
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                if not _is_transient(exc):
                    raise DownloadError(
                        f"{remote.filename}: download from {remote.url} failed: {exc!r}"
                    ) from exc
                if attempt >= retries:
                    have = part.stat().st_size if part.exists() else 0
                    raise DownloadError(
                        f"{remote.filename}: download from {remote.url} failed after "
                        f"{attempt + 1} attempt(s): {exc!r}; {have} bytes kept in {part} for resume"
                    ) from exc
                attempt += 1
                delay = min(RETRY_BACKOFF_S * 2 ** (attempt - 1), _MAX_BACKOFF_S)
                _say(
                    f"{remote.filename}: {exc!r}; retry {attempt}/{retries} in {delay:.1f}s (resuming)"
                )
                if delay > 0:
                    time.sleep(delay)

    actual_size = part.stat().st_size
    expected_size = remote.size if remote.size is not None else total
    if expected_size is not None and actual_size != expected_size:
        part.unlink()
        source = "registry" if remote.size is not None else "server"
        raise DownloadError(
            f"{remote.filename}: size mismatch: expected {expected_size} bytes ({source}), "
            f"got {actual_size} bytes; partial file deleted"
        )
    actual_sha = _sha256_of(part)
    if remote.sha256 is not None:
        if actual_sha != remote.sha256.lower():
            part.unlink()
            raise DownloadError(
                f"{remote.filename}: sha256 mismatch: expected {remote.sha256.lower()}, "
                f"got {actual_sha}; partial file deleted"
            )
    else:
        _say(
            f"{remote.filename}: {actual_size} bytes, sha256 {actual_sha} (not pinned in the registry)"
        )
    os.replace(part, final)
    return final


def download(name: str, dest_dir: Path | None = None, *, progress: bool = True) -> list[Path]:
    """Download every file of a registry entry.

    Args:
        name: registry key (``electro``, ``clothing``, ``taobao``).
        dest_dir: destination; defaults to the entry's ``default_dest`` (``data/raw/amazon``
            or ``data/raw/taobao``) relative to the current working directory.
        progress: show rich progress bars.

    Returns:
        Paths of the dataset's files, in registry order (manual files last).

    Raises:
        KeyError: unknown dataset name.
        ManualDownloadRequired: a file that must be placed by hand is missing.
        DownloadError: a download failed.
    """
    entry = _entry(name)
    dest = Path(dest_dir) if dest_dir is not None else Path(entry.default_dest)
    paths = [download_file(remote, dest, progress=progress) for remote in resolve_files(name)]
    for filename in entry.manual_files:
        path = dest / filename
        if not path.is_file():
            template = entry.manual_instructions or "Place {file} manually into {dest}"
            raise ManualDownloadRequired(template.format(dest=dest.resolve(), file=filename))
        _say(f"{filename}: already present at {path}, skipping")
        paths.append(path)
    return paths


def _registry_table() -> Table:
    table = Table(title="seqrank datasets", show_lines=True)
    table.add_column("name", style="bold")
    table.add_column("description")
    table.add_column("default dest")
    table.add_column("files", overflow="fold")
    for name, entry in REGISTRY.items():
        lines = [
            f"{f.filename}\n  {f.url}"
            + (f"\n  size {f.size}" if f.size is not None else "")
            + (f"\n  sha256 {f.sha256}" if f.sha256 else "")
            for f in resolve_files(name)
        ]
        lines += [f"{m}\n  manual: {entry.homepage}" for m in entry.manual_files]
        table.add_row(name, entry.description, entry.default_dest, "\n".join(lines))
    return table


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m seqrank.data.download",
        description=f"Download raw dataset files. Set {MIRROR_ENV} to use a mirror.",
    )
    parser.add_argument("dataset", nargs="?", choices=sorted(REGISTRY), help="dataset to fetch")
    parser.add_argument("--dest", type=Path, default=None, help="destination directory")
    parser.add_argument("--no-progress", action="store_true", help="disable progress bars")
    parser.add_argument("--list", action="store_true", help="print the registry and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: arguments without the program name; defaults to ``sys.argv[1:]``.

    Returns:
        0 on success, 1 on a failed download, 2 when a manual download is required
        (argparse usage errors exit with 2 through `SystemExit`).
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.list:
        Console(soft_wrap=False).print(_registry_table())
        return 0
    if args.dataset is None:
        parser.error(f"a dataset is required (choose from {', '.join(sorted(REGISTRY))}) or --list")
    try:
        paths = download(args.dataset, args.dest, progress=not args.no_progress)
    except ManualDownloadRequired as exc:
        _say(str(exc))
        return 2
    except DownloadError as exc:
        _say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        _say("interrupted; partial files (*.part) are kept and will be resumed next time")
        return 130
    for path in paths:
        _say(f"ok: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
