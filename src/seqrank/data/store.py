"""The processed store: one folder of .npy arrays + meta.json per data fingerprint.

Layout of `<root>/<name>-<fingerprint[:12]>/`:
    events.{item,ts,behavior}.npy, user_offsets.npy, item_cate.npy   ragged events
    {split}.{user,pos,target,label}.npy [+ {split}.oracle.npy]       samples per split
    ids.{user,item,cate}.npy                                         raw ids (index 0 = "")
    meta.json                                                        Schema, fingerprint, report

A store is built in a temp folder beside its final place and renamed into place under a file
lock, so a killed run or two sweep workers never leave or read a half-written store; meta.json is
written last, and a folder without it is never read. `StoreWriter` builds one piece by piece
(arrays appended chunk by chunk, never whole in memory) for the out-of-core preprocessing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from seqrank.data.batching import EventArrays, SampleArrays
from seqrank.data.types import Schema

STORE_VERSION = 2  # 2: counter-based negatives (stores of 1 had Generator-drawn ones)
SPLITS = ("train", "val", "test")
EVENT_FIELDS = ("item", "ts", "behavior")
SAMPLE_FIELDS = ("user", "pos", "target", "label")


def fingerprint(parts: dict[str, Any]) -> str:
    """A stable sha256 over a JSON-able description of the inputs and settings."""
    blob = json.dumps({"store_version": STORE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def file_signature(path: Path) -> dict[str, Any]:
    """Size and mtime of a raw file: cheap, and changes whenever the file is replaced."""
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass
class Store:
    """A loaded store (arrays memory-mapped read-only)."""

    path: Path
    schema: Schema
    meta: dict[str, Any]
    events: EventArrays
    splits: dict[str, SampleArrays]
    oracle: dict[str, np.ndarray]

    def ids(self, kind: str) -> np.ndarray:
        """Raw ids by index for `user`, `item` or `cate` (index 0 is padding, "")."""
        return np.load(self.path / f"ids.{kind}.npy")


class NpyAppender:
    """A 1-D .npy file written by appending chunks; the header gets the final length on close.

    The header is first written for the largest possible length and later rewritten, padded
    with spaces to the same size (the .npy format allows any padding), so no data moves.
    """

    _MAX = (1 << 62,)

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.length = 0
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._size = len(self._header(self._MAX))
        self._file.write(self._header(self._MAX, self._size))

    def _header(self, shape: tuple[int, ...], size: int | None = None) -> bytes:
        d = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": shape,
        }
        text = "{" + "".join(f"'{k}': {v!r}, " for k, v in sorted(d.items())) + "}"
        # magic (6) + version (2) + length (2) + text + padding + newline, a multiple of 64
        need = 10 + len(text) + 1
        total = size if size is not None else -(-need // 64) * 64
        body = (text + " " * (total - need) + "\n").encode("latin1")
        return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body

    def append(self, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        if arr.ndim != 1:
            raise ValueError(f"{self.path.name}: expected a 1-D chunk, got shape {arr.shape}")
        self._file.write(arr.data)
        self.length += len(arr)

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.seek(0)
        self._file.write(self._header((self.length,), self._size))
        self._file.close()


class StoreWriter:
    """Builds a store in a temp folder beside `final`: arrays saved whole or appended in chunks;
    `commit` writes meta.json last and renames the folder into place. Used as a context manager,
    any exception removes the temp folder.
    """

    def __init__(self, final: Path) -> None:
        self.final = final
        self.tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir(parents=True)
        self._appenders: dict[str, NpyAppender] = {}

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        if exc_type is not None:
            self.abort()

    def save(self, name: str, arr: np.ndarray) -> None:
        np.save(self.tmp / f"{name}.npy", arr)

    def append(self, name: str, arr: np.ndarray) -> None:
        """Appends a 1-D chunk to array `name` (created with the first chunk's dtype)."""
        if name not in self._appenders:
            self._appenders[name] = NpyAppender(self.tmp / f"{name}.npy", arr.dtype)
        self._appenders[name].append(arr)

    def close_appended(self) -> None:
        """Finishes every appended array (their headers get the final lengths)."""
        for a in self._appenders.values():
            a.close()

    def commit(self, meta: dict[str, Any]) -> None:
        self.close_appended()
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        if self.final.exists():  # an incomplete leftover (no meta.json): replace it
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        for a in self._appenders.values():
            a._file.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def store_meta(
    meta: dict[str, Any], schema: Schema, splits: list[str], oracle: list[str]
) -> dict[str, Any]:
    """meta.json's content: the caller's meta plus the schema and the names of splits/oracles."""
    return {**meta, "schema": schema.to_dict(), "splits": list(splits), "oracle": sorted(oracle)}


def write_store(
    final: Path,
    *,
    schema: Schema,
    meta: dict[str, Any],
    events: EventArrays,
    splits: dict[str, SampleArrays],
    ids: dict[str, np.ndarray],
    oracle: dict[str, np.ndarray] | None = None,
) -> None:
    """Writes every array into a temp folder, meta.json last, then renames it to `final`."""
    with StoreWriter(final) as w:
        for f in EVENT_FIELDS:
            w.save(f"events.{f}", getattr(events, f))
        w.save("user_offsets", events.user_offsets)
        w.save("item_cate", events.item_cate)
        for split, s in splits.items():
            for f in SAMPLE_FIELDS:
                w.save(f"{split}.{f}", getattr(s, f))
        for split, scores in (oracle or {}).items():
            w.save(f"{split}.oracle", scores)
        for kind, arr in ids.items():
            w.save(f"ids.{kind}", arr)
        w.commit(store_meta(meta, schema, list(splits), list(oracle or {})))


def load_arrays(path: Path, split_names: list[str]) -> tuple[EventArrays, dict[str, SampleArrays]]:
    """The events and the samples of `split_names` in folder `path`, memory-mapped read-only."""

    def arr(name: str) -> np.ndarray:
        return np.load(path / f"{name}.npy", mmap_mode="r")

    events = EventArrays(
        item=arr("events.item"),
        ts=arr("events.ts"),
        behavior=arr("events.behavior"),
        user_offsets=arr("user_offsets"),
        item_cate=arr("item_cate"),
    )
    return events, {s: SampleArrays(*(arr(f"{s}.{f}") for f in SAMPLE_FIELDS)) for s in split_names}


def load_store(path: Path) -> Store:
    """Loads a complete store; a folder without meta.json is refused."""
    meta_file = path / "meta.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{path}: not a complete store (no meta.json)")
    meta = json.loads(meta_file.read_text())
    schema = Schema.from_dict(meta["schema"])

    events, splits = load_arrays(path, meta["splits"])
    oracle = {s: np.load(path / f"{s}.oracle.npy", mmap_mode="r") for s in meta.get("oracle", [])}
    return Store(path=path, schema=schema, meta=meta, events=events, splits=splits, oracle=oracle)


def ensure_store(root: Path, name: str, fp: str, build: Callable[[Path], None]) -> Path:
    """Returns the store folder for fingerprint `fp`, building it once under a file lock.

    Concurrent callers with the same fingerprint wait on the lock, then reuse the store.
    Leftover temp folders of killed builds are removed while the lock is held.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{name}-{fp[:12]}"
    if (final / "meta.json").exists():
        return final
    with FileLock(str(root / f".{final.name}.lock")):
        if (final / "meta.json").exists():
            return final
        for stale in root.glob(f".tmp-{final.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        build(final)
    return final
