"""Tests for the Amazon 2014 reader (`seqrank.data.sources.amazon`) on tiny files written in the
exact raw formats, on bad input under both bad-line policies, and on the real shared sample."""

from __future__ import annotations

import ast
import gzip
import json
import re
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from seqrank.data.errors import DataError, MissingDataError
from seqrank.data.preprocess import preprocess
from seqrank.data.sources.amazon import (
    UNKNOWN_CATE,
    AmazonSource,
    amazon_paths,
    check_amazon_files,
    parse_literal,
    read_amazon,
)

EVENT_SCHEMA = {
    "user_id": pl.String,
    "item_id": pl.String,
    "cate_id": pl.String,
    "timestamp": pl.Int64,
    "behavior": pl.Int8,
}

META = [
    {  # two category paths: the category is the LAST entry of the LAST path
        "asin": "A1",
        "title": 'Case it\'s "great"',
        "categories": [
            ["Electronics", "Accessories", "Cases"],
            ["Electronics", "Computers", "Cables"],
        ],
    },
    {"asin": "A2", "price": 9.99, "categories": [["Electronics", "Headphones"]]},
    {"asin": "A9", "categories": [["Electronics", "NotReviewed"]]},  # not in the reviews
]


@pytest.fixture
def w(raw_writers: Any) -> Any:
    """The raw-file writers of conftest (reviews, meta, rec)."""
    return raw_writers


def toy_reviews(w: Any) -> list[dict]:
    return [
        w.rec("U2", "A1", 1_300_000_000),
        w.rec("U1", "A1", 1_300_000_100, name=None),  # reviewerName is optional
        w.rec("U1", "A2", 1_200_000_000),
        w.rec("U3", "A3", 1_250_000_000),  # A3 has no meta
    ]


def _files(w: Any, tmp_path: Path, *, gz: bool) -> tuple[Path, Path]:
    ext = ".json.gz" if gz else ".json"
    return (
        w.reviews(tmp_path / f"reviews_Toy_5{ext}", toy_reviews(w)),
        w.meta(tmp_path / "meta_Toy.json.gz", META),
    )


# -- paths and missing files ------------------------------------------------------------------
def test_amazon_paths_prefer_gz_then_plain(tmp_path: Path) -> None:
    r, m = amazon_paths(tmp_path, "Toy")
    assert (r.name, m.name) == ("reviews_Toy_5.json.gz", "meta_Toy.json.gz"), (
        "absent -> .json.gz names"
    )
    (tmp_path / "reviews_Toy_5.json").write_text("{}\n")
    (tmp_path / "meta_Toy.json").write_text("{}\n")
    r, m = amazon_paths(tmp_path, "Toy")
    assert (r.name, m.name) == ("reviews_Toy_5.json", "meta_Toy.json"), "plain .json accepted"
    (tmp_path / "reviews_Toy_5.json.gz").write_bytes(gzip.compress(b"{}\n"))
    r, _ = amazon_paths(str(tmp_path), "Toy")
    assert r == tmp_path / "reviews_Toy_5.json.gz", ".json.gz preferred over .json"


def test_missing_files_name_both_paths_and_the_download_command(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    reviews, meta = amazon_paths(raw, "Electronics")
    with pytest.raises(MissingDataError) as e:
        check_amazon_files(reviews, meta, "electro")
    msg = str(e.value)
    assert str(reviews) in msg and str(meta) in msg, msg
    assert "python -m seqrank.data.download electro" in msg, msg
    src = AmazonSource(raw_dir=raw, category="Electronics", download_word="electro")
    with pytest.raises(MissingDataError) as e2:
        src.prepare()
    assert str(reviews) in str(e2.value) and str(meta) in str(e2.value)
    assert "python -m seqrank.data.download electro" in str(e2.value)
    assert isinstance(e2.value, DataError), "MissingDataError is a DataError"


def test_missing_meta_only_is_reported_and_use_meta_false_skips_it(w: Any, tmp_path: Path) -> None:
    w.reviews(tmp_path / "reviews_Toy_5.json", toy_reviews(w))
    src = AmazonSource(raw_dir=tmp_path, category="Toy", download_word="electro")
    with pytest.raises(MissingDataError, match=re.escape(str(tmp_path / "meta_Toy.json.gz"))):
        src.prepare()
    src = AmazonSource(raw_dir=tmp_path, category="Toy", use_meta=False)
    src.prepare()  # nothing missing
    events, report = src.read()
    assert set(events["cate_id"].to_list()) == {UNKNOWN_CATE}
    assert report["items_without_meta"] == 3


# -- good input -------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
def test_read_amazon_events_and_categories(w: Any, tmp_path: Path, gz: bool) -> None:
    reviews, meta = _files(w, tmp_path, gz=gz)
    events, report = read_amazon(reviews, meta)
    assert dict(events.schema) == EVENT_SCHEMA, f"canonical columns and dtypes, got {events.schema}"
    assert events.rows() == [  # file order, no remapping
        ("U2", "A1", "Cables", 1_300_000_000, 1),
        ("U1", "A1", "Cables", 1_300_000_100, 1),
        ("U1", "A2", "Headphones", 1_200_000_000, 1),
        ("U3", "A3", UNKNOWN_CATE, 1_250_000_000, 1),
    ]
    assert (report.reviews, report.users, report.items) == (4, 3, 3)
    assert report.items_without_meta == 1, "A3 has no meta line and must be counted"
    assert report.meta_lines_used == 2, "only the meta lines of reviewed items (A1, A2) are used"
    assert report.bad_lines == {}


def test_amazon_source_reads_like_read_amazon(w: Any, tmp_path: Path) -> None:
    _files(w, tmp_path, gz=True)
    src = AmazonSource(raw_dir=tmp_path, category="Toy", download_word="electro")
    src.prepare()
    events, report = src.read()
    assert events.equals(read_amazon(*amazon_paths(tmp_path, "Toy"))[0])
    assert report["items_without_meta"] == 1 and report["reviews"] == 4
    assert src.oracle() is None
    fp = src.fingerprint()
    assert fp["source"] == "amazon" and len(fp["files"]) == 2


def test_meta_none_gives_every_item_the_unknown_category(w: Any, tmp_path: Path) -> None:
    reviews, _ = _files(w, tmp_path, gz=False)
    events, report = read_amazon(reviews, None)
    assert set(events["cate_id"].to_list()) == {UNKNOWN_CATE}
    assert report.items_without_meta == 3 and report.meta_lines_used == 0


def test_bad_line_policy_is_validated(w: Any, tmp_path: Path) -> None:
    reviews, meta = _files(w, tmp_path, gz=False)
    with pytest.raises(ValueError, match="data.on_bad_line"):
        read_amazon(reviews, meta, on_bad_line="ignore")


# -- bad input --------------------------------------------------------------------------------
def good(w: Any, k: int) -> dict:
    return w.rec(f"U{k}", f"A{k}", 1_300_000_000 + k)


BAD_REVIEW_LINES = {  # case -> (the bad line given the writers, the reason in the message)
    "malformed_json": (lambda w: b'{"reviewerID": "U9", "asin": ', r"malformed JSON"),
    "missing_asin": (
        lambda w: {k: v for k, v in w.rec("U9", "A1", 5).items() if k != "asin"},
        r"missing required field\(s\) \['asin'\]",
    ),
    "string_time": (
        lambda w: w.rec("U9", "A1", "123"),
        r"unixReviewTime must be an integer, got '123'",
    ),
    "float_time": (
        lambda w: w.rec("U9", "A1", 123.5),
        r"unixReviewTime must be an integer, got 123.5",
    ),
    "null_time": (
        lambda w: w.rec("U9", "A1", None),
        r"missing required field\(s\) \['unixReviewTime'\]",
    ),
    "non_utf8": (
        lambda w: b'{"reviewerID": "U\xff\xfe9", "asin": "A1", "unixReviewTime": 5}',
        r"not valid UTF-8",
    ),
    "blank_line": (lambda w: b"", r"empty line"),
    "json_array": (lambda w: b"[1, 2]", r"expected a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_REVIEW_LINES))
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_bad_review_line(w: Any, tmp_path: Path, case: str, gz: bool) -> None:
    make_bad, reason = BAD_REVIEW_LINES[case]
    lines = [good(w, 1), make_bad(w), good(w, 2)]
    path = w.reviews(tmp_path / ("r.json.gz" if gz else "r.json"), lines)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: {reason}"):
        read_amazon(path, None, on_bad_line="error")
    events, report = read_amazon(path, None, on_bad_line="skip")
    assert events["user_id"].to_list() == ["U1", "U2"], f"{case}: the good lines are kept in order"
    assert report.bad_lines == {path.name: 1}, (
        f"{case}: the bad line is counted, got {report.bad_lines}"
    )


def test_several_bad_lines_are_all_counted(w: Any, tmp_path: Path) -> None:
    lines = [good(w, 1), b"{not json", w.rec("U9", "A1", "7"), good(w, 2), b"\xff\xff", good(w, 3)]
    path = w.reviews(tmp_path / "r.json", lines)
    events, report = read_amazon(path, None, on_bad_line="skip")
    assert events["user_id"].to_list() == ["U1", "U2", "U3"]
    assert report.bad_lines == {"r.json": 3} and report.reviews == 3


def _truncated_gzip(w: Any, tmp_path: Path, n_lines: int = 300) -> tuple[Path, int]:
    """A gzip of `n_lines` reviews cut in the middle; returns it and its number of whole lines."""
    data = b"".join(
        (json.dumps(w.rec(f"U{k:04d}", f"A{k % 7}", 1_300_000_000 + k)) + "\n").encode()
        for k in range(n_lines)
    )
    blob = gzip.compress(data, mtime=0)
    cut = blob[: len(blob) // 2]
    path = tmp_path / "cut.json.gz"
    path.write_bytes(cut)
    partial = zlib.decompressobj(wbits=31).decompress(cut)
    whole = partial.count(b"\n")
    assert 0 < whole < n_lines and not partial.endswith(b"\n"), "test setup: cut inside a line"
    return path, whole


def test_truncated_gzip(w: Any, tmp_path: Path) -> None:
    path, whole = _truncated_gzip(w, tmp_path)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:{whole + 1}: truncated gzip"):
        read_amazon(path, None)
    events, report = read_amazon(path, None, on_bad_line="skip")
    assert events.height == whole, "complete lines of a cut gzip are kept"
    assert events["user_id"][-1] == f"U{whole - 1:04d}"
    assert report.bad_lines == {path.name: 1}


def test_truncated_meta_gzip(w: Any, tmp_path: Path) -> None:
    reviews = w.reviews(tmp_path / "r.json", [good(w, 1)])
    meta_lines = [{"asin": f"A{k}", "categories": [["E", f"C{k}"]]} for k in range(1, 400)]
    blob = gzip.compress(b"".join(repr(m).encode() + b"\n" for m in meta_lines), mtime=0)
    meta = tmp_path / "m.json.gz"
    meta.write_bytes(blob[: len(blob) * 2 // 3])
    with pytest.raises(DataError, match=rf"^{re.escape(str(meta))}:\d+: truncated gzip"):
        read_amazon(reviews, meta)
    events, report = read_amazon(reviews, meta, on_bad_line="skip")
    assert events["cate_id"].to_list() == ["C1"] and report.bad_lines == {meta.name: 1}


@pytest.mark.parametrize("policy", ["error", "skip"])
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_empty_reviews_file(tmp_path: Path, policy: str, gz: bool) -> None:
    path = tmp_path / ("r.json.gz" if gz else "r.json")
    path.write_bytes(gzip.compress(b"", mtime=0) if gz else b"")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: empty file"):
        read_amazon(path, None, on_bad_line=policy)


def test_empty_meta_file(w: Any, tmp_path: Path) -> None:
    reviews = w.reviews(tmp_path / "r.json", [good(w, 1)])
    meta = tmp_path / "m.json"
    meta.write_bytes(b"\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(meta))}: empty file"):
        read_amazon(reviews, meta)


def test_only_bad_review_lines_under_skip_is_an_error(w: Any, tmp_path: Path) -> None:
    path = w.reviews(tmp_path / "r.json", [b"{bad", b"{worse"])
    with pytest.raises(DataError, match="no usable review lines"):
        read_amazon(path, None, on_bad_line="skip")


def test_meta_code_is_never_executed(w: Any, tmp_path: Path) -> None:
    sentinel = tmp_path / "PWNED"
    reviews = w.reviews(tmp_path / "r.json", [good(w, 1), good(w, 2)])
    evil = f"{{'asin': 'A1', 'title': __import__('pathlib').Path({str(sentinel)!r}).touch()}}"
    meta = w.meta(tmp_path / "m.json.gz", [evil, {"asin": "A2", "categories": [["E", "Ok"]]}])
    with pytest.raises(DataError, match=rf"^{re.escape(str(meta))}:1: not a Python literal") as e:
        read_amazon(reviews, meta)
    assert not isinstance(e.value, MissingDataError)
    assert not sentinel.exists(), "a meta line was executed"
    events, report = read_amazon(reviews, meta, on_bad_line="skip")
    assert not sentinel.exists(), "a meta line was executed"
    assert events["cate_id"].to_list() == [UNKNOWN_CATE, "Ok"], "A1's meta line was bad: unknown"
    assert report.bad_lines == {meta.name: 1} and report.items_without_meta == 1


def test_meta_lines_of_unwanted_items_are_not_parsed(w: Any, tmp_path: Path) -> None:
    reviews = w.reviews(tmp_path / "r.json", [good(w, 1)])
    meta = w.meta(
        tmp_path / "m.json",
        ["{'asin': 'ZZ', 'x': oops(}", {"asin": "A1", "categories": [["E", "X"]]}],
    )
    events, report = read_amazon(reviews, meta)  # the broken line is for an item not reviewed
    assert events["cate_id"].to_list() == ["X"] and report.bad_lines == {}


def test_meta_non_dict_and_non_utf8_lines(w: Any, tmp_path: Path) -> None:
    reviews = w.reviews(tmp_path / "r.json", [good(w, 1), good(w, 2)])
    meta = w.meta(tmp_path / "m.json", ["['A1', 'asin']", b"{'asin': 'A2', 't': '\xff'}"])
    with pytest.raises(DataError, match=rf"^{re.escape(str(meta))}:1: expected a dict literal"):
        read_amazon(reviews, meta)
    _, report = read_amazon(reviews, meta, on_bad_line="skip")
    assert report.bad_lines == {"m.json": 2}, report.bad_lines


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_meta_literal_with_unhashable_key_is_a_clean_bad_line(
    w: Any, tmp_path: Path, policy: str
) -> None:
    reviews = w.reviews(tmp_path / "r.json", [good(w, 1)])
    meta = w.meta(tmp_path / "m.json", ["{'asin': 'A1', 'related': {['B1']: 1}}"])
    if policy == "error":
        with pytest.raises(DataError, match=rf"^{re.escape(str(meta))}:1: not a Python literal"):
            read_amazon(reviews, meta, on_bad_line=policy)
    else:
        _, report = read_amazon(reviews, meta, on_bad_line=policy)
        assert report.bad_lines == {"m.json": 1}


def test_meta_without_usable_categories_gives_unknown(w: Any, tmp_path: Path) -> None:
    reviews = w.reviews(tmp_path / "r.json", [good(w, 1), good(w, 2)])
    meta = w.meta(tmp_path / "m.json", [{"asin": "A1"}, {"asin": "A2", "categories": []}])
    events, report = read_amazon(reviews, meta)
    assert events["cate_id"].to_list() == [UNKNOWN_CATE, UNKNOWN_CATE]
    assert report.meta_lines_used == 2 and report.items_without_meta == 2


# -- the real shared sample -------------------------------------------------------------------
def test_real_sample_reviews(real_reviews: Path) -> None:
    events, report = read_amazon(real_reviews, None)
    assert events.height == 237 and report.reviews == 237
    assert events["user_id"].n_unique() == 237 and report.users == 237
    assert Counter(events["item_id"].to_list()) == {
        "0972683275": 219,
        "0594481813": 8,
        "0528881469": 5,
        "0594451647": 5,
    }
    ts = events["timestamp"]
    assert (ts.min(), ts.max()) == (1203379200, 1405123200), "unixReviewTime range of the sample"
    assert set(events["cate_id"].to_list()) == {UNKNOWN_CATE}, "meta_path=None: all unknown"
    assert report.items == 4 and report.items_without_meta == 4 and report.bad_lines == {}
    assert events["user_id"][18] == "A20XXTXWF2TCPY", (
        "line 19 (no reviewerName) must be kept in place"
    )
    assert dict(events.schema) == EVENT_SCHEMA


def test_real_sample_via_source(real_reviews: Path) -> None:
    src = AmazonSource(raw_dir=real_reviews.parent, category="Electronics", use_meta=False)
    src.prepare()
    events, report = src.read()
    assert events.height == 237 and report["items_without_meta"] == 4


def test_peer_csv_through_preprocess(peer_csv: Path, split_invariants) -> None:
    raw = pl.read_csv(peer_csv)
    assert raw.columns == ["user_id", "item_id", "time", "cate_id"] and raw.height == 62
    events = raw.select(
        pl.col("user_id").cast(pl.String),
        pl.col("item_id").cast(pl.String),
        pl.col("cate_id").cast(pl.String),
        pl.col("time").cast(pl.Int64).alias("timestamp"),
        pl.lit(1, dtype=pl.Int8).alias("behavior"),
    )
    assert sorted(set(events["user_id"].to_list())) == [str(u) for u in range(10)]
    p = preprocess(events, protocol="loo", seed=0)
    split_invariants(p, events, "loo")
    kept = p.report["users"]
    assert kept + p.report["users_dropped_too_short"] == 10
    assert len(p.splits["val"]) == 2 * kept and len(p.splits["test"]) == 2 * kept
    assert p.report["events"] == int(np.diff(p.events.user_offsets).sum())


@pytest.mark.parametrize(
    "text",
    [
        r"""{'asin': 'A1', 'categories': [['E', 'x']], 'price': -1.5e3, 'related': {}}""",
        r"""{'a': "it's", 'b': '12" x', 'c': "a', 'b"}""",
        r"""['x\\y', 'q\n\t\r\b\f', 'it\'s \"g\"', "a\\\"b", "\'", '\"']""",
        r"""['\x41', '\u00e9', 'a\/b', '\d', '\a\v\0', u'x', b'x']""",  # escapes JSON lacks: ast
        r"""{'t': 'true', 1: 'x', 'a': (1, 2), 'b': True, 'c': None}""",
        r"""{'a': 'x', 'a': 'y', 'b': [1e400, -0.0, 10000000000000000000000], 'c': 'x' 'y'}""",
        "['tab\there']",
    ],
)
def test_parse_literal_is_literal_eval(text: str) -> None:
    """The JSON fast path of the meta parser returns exactly what `ast.literal_eval` does."""
    want = ast.literal_eval(text)
    assert parse_literal(text) == want and repr(parse_literal(text)) == repr(want)


@pytest.mark.parametrize(
    "text",
    ['{"a": true}', '{"a": NaN}', "[null]", "[-Infinity]", "{'a': __import__('os')}", "{'a': 'x'"],
)
def test_parse_literal_refuses_what_literal_eval_refuses(text: str) -> None:
    with pytest.raises((ValueError, SyntaxError)):
        parse_literal(text)
