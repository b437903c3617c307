"""The processed store and the downloader under interruption and concurrency, through the
processes a user runs: a preprocessing run killed mid-write is rebuilt by the next run (never
read half-written); two runs preparing the same data at once build it once and share it; a
download cut at any byte resumes, and a checksum mismatch deletes the partial file and says so;
a NaN loss stops the run with a message naming the step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from seqrank.data.download import DownloadError, RemoteFile, download_file
from tests.conftest import ROOT
from tests.data.test_download import Server, server  # noqa: F401 - the local HTTP server fixture
from tests.reliability.conftest import TINY_RUN, results, run_in_process

PREP_ONLY = [*TINY_RUN, "train=false", "test=false"]


def _helper(tmp_path: Path, mode: str, marker: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.reliability.helpers",
            mode,
            str(marker),
            f"paths.root_dir={tmp_path}",
            *overrides,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _stores(processed: Path) -> list[Path]:
    return sorted(p for p in processed.iterdir() if not p.name.startswith("."))


def _arrays(store: Path) -> dict[str, np.ndarray]:
    return {p.name: np.load(p, allow_pickle=False) for p in sorted(store.glob("*.npy"))}


def test_preprocessing_killed_mid_write_is_rebuilt_by_the_next_run(tmp_path: Path) -> None:
    marker = tmp_path / "hung"
    proc = _helper(tmp_path, "hang", marker, *PREP_ONLY, f"hydra.run.dir={tmp_path / 'killed'}")
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), proc.communicate()[0][-3000:] if proc.poll() is not None else "timeout"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    processed = tmp_path / "data" / "processed"
    assert _stores(processed) == [], "nothing under the final name while the build was running"
    assert list(processed.glob(".tmp-*")), "the killed build left its temp folder"

    msg, cfg = run_in_process(tmp_path, PREP_ONLY)  # the next run, as train.py runs it
    assert msg is None and results(cfg.paths.output_dir)["status"] == "completed"
    (store,) = _stores(processed)
    assert (store / "meta.json").exists() and not list(processed.glob(".tmp-*")), (
        "rebuilt, leftovers removed"
    )

    clean = tmp_path / "clean"
    msg, _ = run_in_process(clean, PREP_ONLY)
    (ref,) = _stores(clean / "data" / "processed")
    got, want = _arrays(store), _arrays(ref)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want), (
        "the rebuilt store equals a clean build"
    )


@pytest.mark.slow
def test_two_runs_preparing_the_same_data_build_it_once(tmp_path: Path) -> None:
    runs = [
        _helper(
            tmp_path,
            "slow",
            tmp_path / "unused",
            *PREP_ONLY,
            f"hydra.run.dir={tmp_path / f'run{k}'}",
        )
        for k in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in runs]
    assert [p.returncode for p in runs] == [0, 0], [o[-2000:] for o in outs]
    builds = [o.count("building processed store") for o in outs]
    assert sorted(builds) == [0, 1], f"exactly one run builds the store, got {builds}"
    processed = tmp_path / "data" / "processed"
    (store,) = _stores(processed)
    assert not list(processed.glob(".tmp-*"))
    for k in range(2):
        assert results(tmp_path / f"run{k}")["status"] == "completed"


PAYLOAD = bytes(range(256)) * 2 + b"tail"  # 516 bytes


def _remote(server: Server, sha256: str | None = None) -> RemoteFile:  # noqa: F811
    return RemoteFile(
        url=server.url("/files/small.bin"), filename="small.bin", size=len(PAYLOAD), sha256=sha256
    )


def test_download_cut_at_any_byte_resumes(server: Server, tmp_path: Path) -> None:  # noqa: F811
    import hashlib

    sha = hashlib.sha256(PAYLOAD).hexdigest()
    server.state.files["/files/small.bin"] = PAYLOAD
    for cut in range(len(PAYLOAD)):
        dest = tmp_path / str(cut)
        server.state.cut_after, server.state.cuts_left = cut, 1
        with pytest.raises(DownloadError, match=r"small\.bin: download .* failed"):
            download_file(
                _remote(server, sha), dest, progress=False, timeout=5, retries=0, chunk_size=64
            )
        part = dest / "small.bin.part"
        assert not (dest / "small.bin").exists(), f"cut at {cut}: no file under the final name"
        assert (part.stat().st_size if part.exists() else 0) <= cut
        path = download_file(_remote(server, sha), dest, progress=False, timeout=5, chunk_size=64)
        assert path.read_bytes() == PAYLOAD, f"cut at byte {cut}: resumed file differs"
        assert sorted(p.name for p in dest.iterdir()) == ["small.bin"]


def test_checksum_mismatch_deletes_the_partial_file_and_says_so(
    server: Server,  # noqa: F811 - the imported fixture
    tmp_path: Path,
) -> None:
    server.state.files["/files/small.bin"] = PAYLOAD
    wrong = "0" * 64
    with pytest.raises(
        DownloadError,
        match=r"small\.bin: sha256 mismatch: expected 0{64}, got [0-9a-f]{64}; partial file deleted",
    ):
        download_file(_remote(server, wrong), tmp_path, progress=False, timeout=5)
    assert list(tmp_path.iterdir()) == [], "neither the file nor its .part is left"


def test_nan_loss_stops_the_run_naming_the_step(tmp_path: Path) -> None:
    msg, cfg = run_in_process(tmp_path, [*TINY_RUN, "model.optimizer.lr=1e30"])  # diverges at once
    assert msg is not None and msg.startswith(
        "error: training loss is nan at global step 1 (epoch 0, batch 1)"
    ), msg
    res = results(cfg.paths.output_dir)
    assert res["status"] == "failed" and "global step 1" in res["error"]
