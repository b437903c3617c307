"""The processed store: one folder of .npy arrays + meta.json per data fingerprint.

Layout of `<root>/<name>-<fingerprint[:12]>/`:
    events.{item,ts,behavior}.npy, user_offsets.npy, item_cate.npy   ragged events
    {split}.{user,pos,target,label}.npy [+ {split}.oracle.npy]       samples per split
    ids.{user,item,cate}.npy                                         raw ids (index 0 = "")
    meta.json                                                        Schema, fingerprint, report

A store is built in a temp folder beside its final place and renamed into place under a file
lock, so a killed run or two sweep workers never leave or read a half-written store; meta.json is
written last, and a folder without it is never read.
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

STORE_VERSION = 1
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
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for f in EVENT_FIELDS:
            np.save(tmp / f"events.{f}.npy", getattr(events, f))
        np.save(tmp / "user_offsets.npy", events.user_offsets)
        np.save(tmp / "item_cate.npy", events.item_cate)
        for split, s in splits.items():
            for f in SAMPLE_FIELDS:
                np.save(tmp / f"{split}.{f}.npy", getattr(s, f))
        for split, scores in (oracle or {}).items():
            np.save(tmp / f"{split}.oracle.npy", scores)
        for kind, arr in ids.items():
            np.save(tmp / f"ids.{kind}.npy", arr)
        full = {**meta, "schema": schema.to_dict(), "splits": list(splits), "oracle": sorted(oracle or {})}
        (tmp / "meta.json").write_text(json.dumps(full, indent=2, default=str))
        if final.exists():  # an incomplete leftover (no meta.json): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_store(path: Path) -> Store:
    """Loads a complete store; a folder without meta.json is refused."""
    meta_file = path / "meta.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{path}: not a complete store (no meta.json)")
    meta = json.loads(meta_file.read_text())
    schema = Schema.from_dict(meta["schema"])

    def arr(name: str) -> np.ndarray:
        return np.load(path / f"{name}.npy", mmap_mode="r")

    events = EventArrays(
        item=arr("events.item"),
        ts=arr("events.ts"),
        behavior=arr("events.behavior"),
        user_offsets=arr("user_offsets"),
        item_cate=arr("item_cate"),
    )
    splits = {s: SampleArrays(*(arr(f"{s}.{f}") for f in SAMPLE_FIELDS)) for s in meta["splits"]}
    oracle = {s: arr(f"{s}.oracle") for s in meta.get("oracle", [])}
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
