"""The processed store: round trip, atomic writes, stale temp folders, one build under a lock."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from seqrank.data import store as store_mod
from seqrank.data.batching import EventArrays, SampleArrays
from seqrank.data.preprocess import Processed, preprocess
from seqrank.data.store import ensure_store, file_signature, fingerprint, load_store, write_store
from seqrank.data.types import Schema


@pytest.fixture(scope="module")
def processed(sim_events: pl.DataFrame) -> Processed:
    return preprocess(sim_events.head(300), protocol="loo", seed=1)


def schema_of(p: Processed, name: str = "toy") -> Schema:
    return Schema(
        name=name,
        num_users=len(p.ids["user"]),
        num_items=len(p.ids["item"]),
        num_cates=len(p.ids["cate"]),
        num_behaviors=2,
        behavior_names=("review",),
        protocol="loo",
        split_sizes={k: len(v) for k, v in p.splits.items()},
        unknown_cate=0,
    )


def write(final: Path, p: Processed, **kw) -> None:
    oracle = {k: np.linspace(0, 1, len(v)) for k, v in p.splits.items()}
    write_store(
        final,
        schema=kw.pop("schema", schema_of(p)),
        meta={"fingerprint": "abc", "note": [1, 2]},
        events=p.events,
        splits=p.splits,
        ids=p.ids,
        oracle=oracle,
        **kw,
    )


def leftovers(root: Path) -> list[str]:
    return sorted(x.name for x in root.iterdir() if x.name.startswith(".tmp-"))


def test_round_trip(tmp_path: Path, processed: Processed) -> None:
    final = tmp_path / "toy-0123456789ab"
    write(final, processed)
    st = load_store(final)
    assert st.schema == schema_of(processed), "Schema must survive meta.json"
    assert st.meta["fingerprint"] == "abc" and st.meta["note"] == [1, 2]
    assert st.meta["splits"] == ["train", "val", "test"]
    for f in ("item", "ts", "behavior", "user_offsets", "item_cate"):
        a, b = getattr(st.events, f), getattr(processed.events, f)
        assert a.dtype == b.dtype and np.array_equal(a, b), f"events.{f}"
        assert isinstance(a, np.memmap) and not a.flags.writeable, (
            f"events.{f} must be a read-only memmap"
        )
    for split, s in processed.splits.items():
        for f in ("user", "pos", "target", "label"):
            a, b = getattr(st.splits[split], f), getattr(s, f)
            assert a.dtype == b.dtype and np.array_equal(a, b), f"{split}.{f}"
        assert np.array_equal(st.oracle[split], np.linspace(0, 1, len(s)))
    for kind in ("user", "item", "cate"):
        assert np.array_equal(st.ids(kind), processed.ids[kind]), f"ids.{kind}"
    assert leftovers(tmp_path) == []


def test_round_trip_without_oracle_and_val(tmp_path: Path, processed: Processed) -> None:
    final = tmp_path / "paper"
    splits = {k: v for k, v in processed.splits.items() if k != "val"}
    write_store(
        final,
        schema=schema_of(processed),
        meta={},
        events=processed.events,
        splits=splits,
        ids=processed.ids,
    )
    st = load_store(final)
    assert set(st.splits) == {"train", "test"} and st.oracle == {}


def test_schema_dict_round_trip_and_unknown_keys() -> None:
    s = Schema("x", 3, 4, 5, 2, ("review",), "paper", {"train": 4}, 1)
    assert Schema.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(ValueError, match="unknown keys"):
        Schema.from_dict({**s.to_dict(), "bogus": 1})


def test_folder_without_meta_is_refused(tmp_path: Path, processed: Processed) -> None:
    final = tmp_path / "toy"
    write(final, processed)
    (final / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        load_store(final)
    with pytest.raises(FileNotFoundError):
        load_store(tmp_path / "never-written")


class Boom(RuntimeError):
    pass


class BadSchema:
    def to_dict(self) -> dict:
        raise Boom("schema cannot be written")


def test_failed_write_leaves_no_final_and_no_temp(tmp_path: Path, processed: Processed) -> None:
    final = tmp_path / "toy"
    with pytest.raises(Boom):
        write(final, processed, schema=BadSchema())  # fails after every array is written
    assert not final.exists() and leftovers(tmp_path) == [], sorted(
        p.name for p in tmp_path.iterdir()
    )


def test_interrupted_write_leaves_no_temp(
    tmp_path: Path, processed: Processed, monkeypatch
) -> None:
    calls = {"n": 0}
    real_save = np.save

    def save(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_save(*a, **k)

    monkeypatch.setattr(store_mod.np, "save", save)
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path / "toy", processed)
    monkeypatch.undo()
    assert not (tmp_path / "toy").exists() and leftovers(tmp_path) == []


def test_ensure_store_build_that_raises_leaves_nothing(
    tmp_path: Path, processed: Processed
) -> None:
    root = tmp_path / "processed"
    fp = fingerprint({"x": 1})

    def bad_build(final: Path) -> None:
        write(final, processed, schema=BadSchema())

    with pytest.raises(Boom):
        ensure_store(root, "toy", fp, bad_build)
    assert not (root / f"toy-{fp[:12]}").exists() and leftovers(root) == []
    path = ensure_store(root, "toy", fp, lambda final: write(final, processed))
    assert path == root / f"toy-{fp[:12]}" and load_store(path).schema == schema_of(processed)


def test_stale_temp_folder_is_removed_by_next_ensure_store(
    tmp_path: Path, processed: Processed
) -> None:
    root = tmp_path
    fp = fingerprint({"x": 2})
    stale = root / f".tmp-toy-{fp[:12]}-deadbeef"
    stale.mkdir()
    (stale / "events.item.npy").write_bytes(b"half")
    path = ensure_store(root, "toy", fp, lambda final: write(final, processed))
    assert not stale.exists(), "a killed build's temp folder must be removed"
    assert leftovers(root) == [] and (path / "meta.json").exists()


def test_incomplete_final_folder_is_rebuilt(tmp_path: Path, processed: Processed) -> None:
    fp = fingerprint({"x": 3})
    final = tmp_path / f"toy-{fp[:12]}"
    final.mkdir()
    (final / "junk.npy").write_bytes(b"x")
    calls = []
    path = ensure_store(tmp_path, "toy", fp, lambda f: (calls.append(f), write(f, processed)))
    assert calls == [final] and path == final and not (final / "junk.npy").exists()
    assert load_store(final).schema == schema_of(processed)


def test_existing_store_is_reused_without_building(tmp_path: Path, processed: Processed) -> None:
    fp = fingerprint({"x": 4})
    calls: list[Path] = []

    def build(final: Path) -> None:
        calls.append(final)
        write(final, processed)

    a = ensure_store(tmp_path, "toy", fp, build)
    b = ensure_store(tmp_path, "toy", fp, build)
    assert a == b and len(calls) == 1


def test_two_threads_build_once(tmp_path: Path, processed: Processed) -> None:
    fp = fingerprint({"x": 5})
    calls: list[Path] = []
    barrier = threading.Barrier(2)
    results: dict[int, Path] = {}
    errors: list[BaseException] = []

    def build(final: Path) -> None:
        calls.append(final)
        time.sleep(0.3)  # long enough for the other thread to queue on the lock
        write(final, processed)

    def worker(k: int) -> None:
        try:
            barrier.wait(timeout=10)
            results[k] = ensure_store(tmp_path, "toy", fp, build)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert len(calls) == 1, f"the build ran {len(calls)} times"
    assert results[0] == results[1] == tmp_path / f"toy-{fp[:12]}"
    assert load_store(results[0]).schema == schema_of(processed)


def test_changed_fingerprint_gives_a_new_folder(tmp_path: Path, processed: Processed) -> None:
    fp1 = fingerprint({"source": {"a": 1}, "protocol": "loo", "seed": 0})
    fp2 = fingerprint({"source": {"a": 1}, "protocol": "loo", "seed": 1})
    assert fp1 != fp2 and len(fp1) == 64
    assert fp1 == fingerprint({"seed": 0, "protocol": "loo", "source": {"a": 1}}), (
        "key order is irrelevant"
    )
    p1 = ensure_store(tmp_path, "toy", fp1, lambda f: write(f, processed))
    p2 = ensure_store(tmp_path, "toy", fp2, lambda f: write(f, processed))
    assert p1 != p2 and (p1 / "meta.json").exists() and (p2 / "meta.json").exists()


def test_file_signature_changes_when_a_file_is_replaced(tmp_path: Path) -> None:
    f = tmp_path / "raw.json"
    f.write_text("a\n")
    s1 = file_signature(f)
    f.write_text("ab\n")
    s2 = file_signature(f)
    assert s1 != s2 and fingerprint({"files": [s1]}) != fingerprint({"files": [s2]})


def _tiny_build(final: Path) -> None:
    """A build usable in a spawned process: counts itself in a file, then writes a tiny store."""
    with open(final.parent / "builds.txt", "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(0.5)
    ev = EventArrays(
        item=np.array([1, 2, 1], np.int32),
        ts=np.arange(3, dtype=np.int64),
        behavior=np.ones(3, np.int8),
        user_offsets=np.array([0, 0, 3]),
        item_cate=np.array([0, 1, 1], np.int32),
    )
    s = SampleArrays(
        np.array([1, 1], np.int32),
        np.array([2, 2], np.int32),
        np.array([1, 2], np.int32),
        np.array([1, 0], np.int8),
    )
    write_store(
        final,
        schema=Schema("p", 2, 3, 2, 2, ("review",), "loo", {"test": 2}),
        meta={},
        events=ev,
        splits={"test": s},
        ids={
            "user": np.array(["", "u"]),
            "item": np.array(["", "a", "b"]),
            "cate": np.array(["", "c"]),
        },
    )


def _ensure_in_process(root: str, k: int, barrier) -> None:  # noqa: ANN001 - a spawn Barrier
    barrier.wait(timeout=60)  # both processes are up: their ensure_store calls overlap
    path = ensure_store(Path(root), "proc", fingerprint({"p": 1}), _tiny_build)
    (Path(root) / f"result{k}.txt").write_text(str(path))


def test_two_spawned_processes_build_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [
        ctx.Process(target=_ensure_in_process, args=(str(tmp_path), k, barrier)) for k in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0], "a worker process failed"
    builds = (tmp_path / "builds.txt").read_text().split()
    assert len(builds) == 1, f"the build ran in {len(builds)} processes"
    paths = [(tmp_path / f"result{k}.txt").read_text() for k in range(2)]
    assert paths[0] == paths[1] == str(tmp_path / f"proc-{fingerprint({'p': 1})[:12]}")
    assert load_store(Path(paths[0])).schema.split_sizes == {"test": 2}
    assert leftovers(tmp_path) == []
