"""Broken raw files through a real run (`run_task(train, cfg)`, as `python train.py` calls it):
under `data.on_bad_line=error` the run stops before building a store with one message naming
the file, the line and the reason; under `skip` it goes on and reports what it skipped (and the
users dropped as too short) in the run summary and in the store's meta.json."""

from __future__ import annotations

import ast
import gzip
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from seqrank.data.synthetic import SyntheticAmazonSpec, generate_amazon
from seqrank.data.synthetic_taobao import SyntheticTaobaoSpec, generate_taobao
from tests.conftest import TINY_MODEL
from tests.reliability.conftest import results, run_in_process

SPEC = SyntheticAmazonSpec(num_users=60, num_items=200, num_cates=10, seed=3)
TAOBAO_SPEC = SyntheticTaobaoSpec(
    num_users=80, num_items=1500, num_cates=30, mean_events=30, seed=5
)
RUN = [
    *TINY_MODEL,
    "trainer=cpu",
    "data.batch_size=64",
    "data.eval_batch_size=256",
    "train=false",
    "+plot_attention=false",
    "callbacks.rich_progress_bar=null",
    "logger=csv",
]
BAD_AT = 5  # the bad line's number in the file


def amazon_files(tmp_path: Path) -> tuple[Path, Path]:
    """Electronics-named raw files (`data=electro` reads them) from the synthetic generator."""
    reviews, meta, _ = generate_amazon(
        tmp_path / "data" / "raw" / "amazon", SPEC, name="Electronics"
    )
    return reviews, meta


def lines_of(path: Path) -> list[bytes]:
    return gzip.decompress(path.read_bytes()).splitlines()


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(gzip.compress(b"".join(line + b"\n" for line in lines), mtime=0))


def insert(path: Path, bad: bytes, at: int = BAD_AT) -> None:
    lines = lines_of(path)
    write_lines(path, [*lines[: at - 1], bad, *lines[at - 1 :]])


def review(**fields: object) -> bytes:
    rec = {"reviewerID": "AXYZ", "asin": "B000000001", "unixReviewTime": 1300000000} | fields
    return json.dumps({k: v for k, v in rec.items() if v is not None}).encode()


def wanted_meta_line(reviews: Path, meta: Path) -> int:
    """Number of a meta line whose item is reviewed (lines of other items are never parsed)."""
    asins = set()
    for line in lines_of(reviews):
        try:
            asins.add(json.loads(line)["asin"])
        except (ValueError, KeyError):
            continue  # a bad line planted by the test
    for k, line in enumerate(lines_of(meta), start=1):
        if ast.literal_eval(line.decode())["asin"] in asins:
            return k
    raise AssertionError("test setup: no meta line of a reviewed item")


def cut_meta_line(reviews: Path, meta: Path) -> tuple[Path, int]:
    k = wanted_meta_line(reviews, meta)
    lines = lines_of(meta)
    lines[k - 1] = lines[k - 1][: len(lines[k - 1]) // 2]  # "{'asin': 'B..', 'categories': [['Ca"
    write_lines(meta, lines)
    return meta, k


def _truncate(path: Path) -> Path:
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    return path


AMAZON_CASES: dict[str, tuple[Callable[[Path, Path], tuple[Path, int | None]], str]] = {
    # case -> (break the files; return the file and bad line number, the reason in the message)
    "truncated_gzip": (lambda r, m: (_truncate(r), -1), "truncated gzip"),
    "malformed_json_line": (
        lambda r, m: (insert(r, b'{"reviewerID": "AXYZ", "asin": '), (r, BAD_AT))[1],
        "malformed JSON",
    ),
    "missing_required_field": (
        lambda r, m: (insert(r, review(asin=None)), (r, BAD_AT))[1],
        "missing required field(s) ['asin']",
    ),
    "non_integer_timestamp": (
        lambda r, m: (insert(r, review(unixReviewTime="2013-06-02")), (r, BAD_AT))[1],
        "unixReviewTime must be an integer, got '2013-06-02'",
    ),
    "non_utf8_bytes": (
        lambda r, m: (
            insert(r, b'{"reviewerID": "A\xff\xfe", "asin": "B1", "unixReviewTime": 1}'),
            (r, BAD_AT),
        )[1],
        "not valid UTF-8",
    ),
    "meta_line_not_a_python_literal": (cut_meta_line, "not a Python literal"),
    "empty_reviews_file": (
        lambda r, m: (write_lines(r, []) or r.write_bytes(b""), (r, None))[1],
        "empty file",
    ),
}


def _no_store(tmp_path: Path) -> bool:
    return not list((tmp_path / "data" / "processed").glob("*/meta.json"))


@pytest.mark.parametrize("case", list(AMAZON_CASES))
def test_bad_amazon_file_stops_naming_file_line_and_reason(case: str, tmp_path: Path) -> None:
    reviews, meta = amazon_files(tmp_path)
    make, reason = AMAZON_CASES[case]
    path, line = make(reviews, meta)
    msg, _ = run_in_process(tmp_path, ["data=electro", *RUN])
    assert msg is not None and msg.startswith(f"error: {path}"), msg
    if line is not None and line > 0:
        assert f"{path}:{line}: " in msg, msg
    elif line == -1:
        assert f"{path}:" in msg and msg.split(f"{path}:")[1].split(":")[0].isdigit(), msg
    assert reason in msg, msg
    if line is not None:
        assert "data.on_bad_line=skip" in msg, "the message says how to skip such lines"
    assert _no_store(tmp_path), "no store is written from a broken file"


TAOBAO_CASES = {
    "userbehavior_row_with_4_columns": ("2,20,200,pv", "4 fields"),
    "userbehavior_row_with_6_columns": ("2,20,200,pv,1511600000,extra", "6 fields"),
    "userbehavior_unknown_behaviour": ("2,20,200,click,1511600000", "unknown behaviour 'click'"),
}


def taobao_file(tmp_path: Path, bad_rows: list[str], at: int = BAD_AT) -> Path:
    path = generate_taobao(tmp_path / "data" / "raw" / "taobao", TAOBAO_SPEC)
    lines = path.read_text().splitlines()
    for k, row in enumerate(bad_rows):  # bad rows at lines at, at+10, ...
        lines.insert(at - 1 + 10 * k, row)
    path.write_text("\n".join(lines) + "\n")
    return path


TAOBAO_RUN = ["data=taobao", *RUN, "model.net.time_unit_seconds=3600"]


@pytest.mark.parametrize("case", list(TAOBAO_CASES))
def test_bad_userbehavior_row_stops_naming_file_line_and_reason(case: str, tmp_path: Path) -> None:
    row, reason = TAOBAO_CASES[case]
    path = taobao_file(tmp_path, [row])
    msg, _ = run_in_process(tmp_path, TAOBAO_RUN)
    assert msg is not None and f"{path}:{BAD_AT}: " in msg and reason in msg, msg
    assert _no_store(tmp_path)


def _meta_json(tmp_path: Path) -> dict:
    (store,) = (tmp_path / "data" / "processed").glob("*/meta.json")
    return json.loads(store.read_text())


def test_skip_counts_bad_amazon_lines_in_summary_and_meta_json(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reviews, meta = amazon_files(tmp_path)
    for bad in (b"{not json", review(asin=None), review(unixReviewTime="7"), b"\xff\xfe"):
        insert(reviews, bad)
    cut_meta_line(reviews, meta)
    caplog.set_level(logging.INFO)
    msg, cfg = run_in_process(tmp_path, ["data=electro", *RUN, "data.on_bad_line=skip"])
    assert msg is None and results(cfg.paths.output_dir)["status"] == "completed"
    assert _meta_json(tmp_path)["reader"]["bad_lines"] == {reviews.name: 4, meta.name: 1}
    assert "bad raw lines skipped: 5" in caplog.text


def test_skip_counts_bad_userbehavior_rows_in_summary_and_meta_json(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = taobao_file(tmp_path, [row for row, _ in TAOBAO_CASES.values()])
    caplog.set_level(logging.INFO)
    msg, cfg = run_in_process(tmp_path, [*TAOBAO_RUN, "data.on_bad_line=skip"])
    assert msg is None and results(cfg.paths.output_dir)["status"] == "completed"
    assert _meta_json(tmp_path)["reader"]["bad_lines"] == {path.name: 3}
    assert "bad raw lines skipped: 3" in caplog.text


def test_too_short_users_are_dropped_counted_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reviews, _ = amazon_files(tmp_path)
    asins = sorted({json.loads(line)["asin"] for line in lines_of(reviews)})
    short = [("SHORT1", 1), ("SHORT2", 2), ("SHORT3", 2)]  # loo needs 3 events per user
    write_lines(
        reviews,
        [*lines_of(reviews)]
        + [
            review(reviewerID=u, asin=asins[k], unixReviewTime=1300000000 + k)
            for u, n in short
            for k in range(n)
        ],
    )
    caplog.set_level(logging.INFO)
    msg, cfg = run_in_process(tmp_path, ["data=electro", *RUN])
    assert msg is None and results(cfg.paths.output_dir)["status"] == "completed"
    prep = _meta_json(tmp_path)["preprocess"]
    assert prep["users_dropped_too_short"] == 3 and prep["users"] == SPEC.num_users
    assert "users dropped as too short: 3" in caplog.text
