"""The synthetic Amazon generator: raw formats, determinism, generator constraints, and the oracle
being the exact next-item distribution of the generator."""

from __future__ import annotations

import ast
import dataclasses
import gzip
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from seqrank.data.batching import SampleArrays
from seqrank.data.preprocess import preprocess
from seqrank.data.sources.amazon import UNKNOWN_CATE, read_amazon
from seqrank.data.synthetic import (
    DAY,
    AmazonOracle,
    SyntheticAmazonSource,
    SyntheticAmazonSpec,
    generate_amazon,
)


def lines(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read().splitlines()


@pytest.fixture(scope="module")
def reviews(tiny_files) -> list[dict]:
    return [json.loads(x) for x in lines(tiny_files[0])]


@pytest.fixture(scope="module")
def processed(tiny_files):
    events, report = read_amazon(tiny_files[0], tiny_files[1])
    return (
        events,
        report,
        preprocess(events, protocol="loo", seed=0, unknown_cate_name=UNKNOWN_CATE),
    )


def test_files_are_gzip_in_the_real_formats(tiny_files, tiny_spec) -> None:
    reviews_path, meta_path, oracle_path = tiny_files
    for p in (reviews_path, meta_path):
        assert p.read_bytes()[:2] == b"\x1f\x8b", f"{p.name} must be gzip"
    assert (
        reviews_path.name == "reviews_Synthetic_5.json.gz"
        and meta_path.name == "meta_Synthetic.json.gz"
    )
    assert oracle_path.exists()
    meta = lines(meta_path)
    for line in meta:
        rec = ast.literal_eval(line)
        assert isinstance(rec, dict) and "asin" in rec
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)  # single quotes: not JSON, as the real meta files
        assert rec["categories"][-1][-1].startswith("Cat"), "category = last entry of the last path"
    assert len(meta) < tiny_spec.num_items, "some items must lack meta"
    assert any("'it\\'s" in x or "it\\'s" in x for x in meta), (
        "titles with quotes are escaped literals"
    )


def test_reviews_sorted_by_asin_and_reviewer_name_optional(reviews) -> None:
    asins = [r["asin"] for r in reviews]
    assert asins == sorted(asins), "reviews are sorted by item, like the real file"
    missing = sum("reviewerName" not in r for r in reviews)
    assert 0 < missing < len(reviews), "some (not all) lines lack reviewerName"
    for r in reviews:
        assert list(r)[:2] == ["reviewerID", "asin"] and isinstance(r["unixReviewTime"], int)
        assert r["unixReviewTime"] % DAY == 0


def test_no_same_day_ties_and_no_repeated_item_per_user(reviews, tiny_spec) -> None:
    per_user: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for r in reviews:
        per_user[r["reviewerID"]].append((r["unixReviewTime"], r["asin"]))
    assert len(per_user) == tiny_spec.num_users
    for u, ev in per_user.items():
        days = [t // DAY for t, _ in ev]
        assert len(set(days)) == len(days), f"user {u}: two reviews on one day"
        items = [a for _, a in ev]
        assert len(set(items)) == len(items), f"user {u}: repeated item"
        assert tiny_spec.min_events <= len(ev) <= tiny_spec.max_events, (
            f"user {u}: {len(ev)} events"
        )


def test_reader_on_synthetic_files(processed, tiny_files) -> None:
    events, report, p = processed
    assert report.bad_lines == {} and report.items_without_meta > 0, report
    assert (events["cate_id"] == UNKNOWN_CATE).sum() > 0, "items without meta get <unknown>"
    oracle = AmazonOracle.load(tiny_files[2])
    gen = {a: i for i, a in enumerate(oracle.asins)}
    known = events.filter(events["cate_id"] != UNKNOWN_CATE)
    for asin, cate in zip(known["item_id"].to_list(), known["cate_id"].to_list(), strict=True):
        assert cate == f"Cat{oracle.item_cate[gen[asin]]:03d}", f"{asin}: wrong category {cate}"
    assert p.report["users_dropped_too_short"] == 0


def test_deterministic_by_seed(tmp_path: Path, tiny_files, tiny_spec) -> None:
    again = generate_amazon(tmp_path / "again", tiny_spec)
    for a, b in zip(tiny_files[:2], again[:2], strict=True):
        assert lines(a) == lines(b), f"{a.name}: same spec must give the same content"
        assert gzip.decompress(a.read_bytes()) == gzip.decompress(b.read_bytes())
    other = generate_amazon(
        tmp_path / "other", dataclasses.replace(tiny_spec, seed=tiny_spec.seed + 1)
    )
    assert lines(tiny_files[0]) != lines(other[0]), "another seed must give other reviews"


def test_gzip_header_is_deterministic(tiny_files) -> None:
    for p in tiny_files[:2]:
        assert p.read_bytes()[4:8] == b"\0\0\0\0", f"{p.name}: gzip header mtime is not fixed"


def test_oracle_probabilities_in_unit_interval(processed, tiny_files) -> None:
    _, _, p = processed
    oracle = AmazonOracle.load(tiny_files[2])
    for split, s in p.splits.items():
        sc = oracle.score(p.events, p.ids["item"], s)
        assert sc.shape == (len(s),) and np.isfinite(sc).all()
        assert (sc > 0).all() and (sc <= 1).all(), f"{split}: oracle scores outside (0, 1]"
    assert np.mean(sc[0::2] > sc[1::2]) > 0.6, "the planted signal: positives usually score higher"


def test_oracle_is_a_distribution_over_unconsumed_items(processed, tiny_files, tiny_spec) -> None:
    """For a sample context (user, pos), scoring EVERY item the user has not consumed before pos
    must sum to 1: the oracle is the generator's exact next-item distribution."""
    _, _, p = processed
    oracle = AmazonOracle.load(tiny_files[2])
    ev = p.events
    # processed ids, then every generator item never reviewed (they are candidates too)
    seen = set(p.ids["item"][1:].tolist())
    item_raw = np.concatenate([p.ids["item"], [a for a in oracle.asins if a not in seen]])
    assert len(item_raw) == tiny_spec.num_items + 1
    all_ids = np.arange(1, len(item_raw))
    rng = np.random.default_rng(0)
    checked = 0
    for split in ("train", "val", "test"):
        s = p.splits[split]
        for k in rng.choice(len(s) // 2, size=4, replace=False) * 2:
            u, pos = int(s.user[k]), int(s.pos[k])
            start = int(ev.user_offsets[u])
            consumed = set(item_raw[ev.item[start : start + pos]].tolist())
            cand = all_ids[~np.isin(item_raw[all_ids], list(consumed))]
            assert len(cand) == tiny_spec.num_items - pos
            ctx = SampleArrays(
                user=np.full(len(cand), u, np.int32),
                pos=np.full(len(cand), pos, np.int32),
                target=cand.astype(np.int32),
                label=np.zeros(len(cand), np.int8),
            )
            probs = oracle.score(ev, item_raw, ctx)
            assert (probs > 0).all() and (probs <= 1).all()
            assert probs.sum() == pytest.approx(1.0, abs=1e-9), (
                f"{split} user {u} pos {pos}: sum {probs.sum()}"
            )
            # the observed item's probability is the one the split's positive got
            obs = int(np.flatnonzero(cand == s.target[k])[0])
            assert probs[obs] == pytest.approx(oracle.score(ev, p.ids["item"], s)[k])
            checked += 1
    assert checked == 12


def test_oracle_save_load_round_trip(tmp_path: Path, tiny_spec) -> None:
    o = AmazonOracle.build(tiny_spec)
    o.save(tmp_path / "o.npz")
    back = AmazonOracle.load(tmp_path / "o.npz")
    assert back.spec == tiny_spec
    for f in ("asins", "item_cate", "item_w", "comp", "catpop"):
        assert np.array_equal(getattr(back, f), getattr(o, f)), f
    assert np.allclose(o.comp.sum(1), 1) and o.catpop.sum() == pytest.approx(1)


def test_oracle_refuses_foreign_items(processed, tiny_files) -> None:
    _, _, p = processed
    oracle = AmazonOracle.load(tiny_files[2])
    raw = p.ids["item"].copy()
    raw[1] = "NOT_AN_ASIN"
    with pytest.raises(ValueError, match="not from this generator"):
        oracle.score(p.events, raw, p.splits["test"])


def test_source_generates_once_and_reads(tmp_path: Path, tiny_spec) -> None:
    spec = dataclasses.asdict(tiny_spec) | {"num_users": 20}
    src = SyntheticAmazonSource(raw_dir=tmp_path, spec=spec)
    src.prepare()
    reviews, meta, oracle_path = src.paths()
    assert (
        all(x.exists() for x in (reviews, meta, oracle_path)) and reviews.parent.parent == tmp_path
    )
    mtime = reviews.stat().st_mtime_ns
    src.prepare()
    assert reviews.stat().st_mtime_ns == mtime, "prepare() must not regenerate existing files"
    events, report = src.read()
    assert report["users"] == 20 and events.height == report["reviews"]
    assert src.oracle().spec == SyntheticAmazonSpec(**spec)
    fp = src.fingerprint()
    assert fp["source"] == "synthetic_amazon" and fp["spec"]["num_users"] == 20
    other = SyntheticAmazonSource(raw_dir=tmp_path, spec=spec | {"seed": 99})
    assert other.raw_dir != src.raw_dir and other.fingerprint() != fp


@pytest.mark.parametrize(
    "field,value",
    [
        ("num_users", 0),
        ("num_items", 0),
        ("num_cates", 0),
        ("min_events", 0),
        ("max_events", -1),
        ("taste_window", 0),
    ],
)
def test_invalid_sizes_name_the_field(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=rf"spec\.{field}={value}"):
        SyntheticAmazonSpec(**{field: value})


def test_invalid_combinations_name_the_fields() -> None:
    with pytest.raises(ValueError, match=r"num_items=15.*num_cates=10"):
        SyntheticAmazonSpec(num_items=15, num_cates=10)
    with pytest.raises(ValueError, match=r"p_complement_recent \+ p_taste \+ p_noise"):
        SyntheticAmazonSpec(p_complement_recent=0.9, p_taste=0.1, p_noise=0.05)
    with pytest.raises(TypeError):
        SyntheticAmazonSource(raw_dir="x", spec={"bogus": 1})


def test_stale_probability_sum_is_validated() -> None:
    with pytest.raises(ValueError, match="p_complement_stale"):
        SyntheticAmazonSpec(p_complement_stale=0.95)


@pytest.mark.parametrize("field", ["p_noise", "p_taste", "p_complement_stale", "p_recent_gap"])
def test_negative_probability_is_refused(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SyntheticAmazonSpec(**{field: -0.1})


@pytest.mark.parametrize(
    "kw",
    [
        {"num_items": 20, "num_cates": 10, "min_events": 30, "max_events": 50},
        {"min_events": 10, "max_events": 5},
    ],
)
def test_more_events_than_items_is_refused(kw: dict) -> None:
    with pytest.raises(ValueError):
        SyntheticAmazonSpec(**kw)
