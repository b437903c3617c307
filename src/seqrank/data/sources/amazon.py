"""Amazon product data, 2014 release (McAuley et al.): 5-core reviews + item meta.

Reviews are strict JSON lines (`reviewerName` may be missing); meta lines are Python literals
(single quotes), parsed with `ast.literal_eval`, never `eval`. Category is the last entry of the
item's last category path, the DIN/ATRank recipe; items without meta get an explicit unknown
category that is counted and reported.
"""

from __future__ import annotations

import ast
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from seqrank.data.errors import BadLines, DataError, MissingDataError
from seqrank.data.rawio import decode_line, read_bytes

UNKNOWN_CATE = "<unknown>"
REVIEW_BEHAVIOR = 1
REQUIRED_REVIEW_KEYS = ("reviewerID", "asin", "unixReviewTime")
_ASIN_RE = re.compile(rb"""['"]asin['"]\s*:\s*['"]([^'"]+)['"]""")
# Python string tokens (no prefix): '...' (group 1) or "..." (group 2), escapes included
_STRING = re.compile(r"'((?:[^'\\]|\\.)*)'" r'|"((?:[^"\\]|\\.)*)"')
_ESCAPE = re.compile(r'\\(.)|"')
_JSON_WORD = re.compile(r"\b(?:true|false|null)\b")
# Python escape -> JSON escape, where both mean the same character
_SAME_ESCAPES = {
    "\\": "\\\\",
    "'": "'",
    '"': '\\"',
    "n": "\\n",
    "t": "\\t",
    "r": "\\r",
    "b": "\\b",
    "f": "\\f",
}

# Public 2014 file names per category; the data configs refer to the short CLI word.
CATEGORIES = {
    "electro": "Electronics",
    "clothing": "Clothing_Shoes_and_Jewelry",
}


@dataclass
class AmazonReport:
    """What the reader saw; goes into the store's meta.json and the run summary."""

    reviews: int = 0
    users: int = 0
    items: int = 0
    items_without_meta: int = 0
    meta_lines_used: int = 0
    bad_lines: dict[str, int] = field(default_factory=dict)


def amazon_paths(raw_dir: Path | str, category: str) -> tuple[Path, Path]:
    """The reviews and meta files for `category`, preferring `.gz`, accepting plain `.json`."""
    raw_dir = Path(raw_dir)

    def pick(stem: str) -> Path:
        for suffix in (".json.gz", ".json"):
            if (raw_dir / f"{stem}{suffix}").exists():
                return raw_dir / f"{stem}{suffix}"
        return raw_dir / f"{stem}.json.gz"

    return pick(f"reviews_{category}_5"), pick(f"meta_{category}")


def check_amazon_files(reviews: Path, meta: Path | None, download_word: str | None) -> None:
    """Stops at once, naming the expected paths and the download command, when files are absent."""
    missing = [p for p in (reviews, meta) if p is not None and not p.exists()]
    if missing:
        hint = (
            f"fetch them with: python -m seqrank.data.download {download_word} --dest {missing[0].parent}"
            if download_word
            else "place them there"
        )
        listed = "\n  ".join(str(p) for p in missing)
        raise MissingDataError(f"raw Amazon files not found:\n  {listed}\n{hint}")


def _reviews_fast(data: bytes) -> pl.DataFrame | None:
    """polars' native NDJSON reader; None when the input needs the line-by-line path."""
    try:
        df = pl.read_ndjson(
            io.BytesIO(data),
            schema={"reviewerID": pl.String, "asin": pl.String, "unixReviewTime": pl.Int64},
        )
    except Exception:  # malformed JSON, wrong types: the slow path reports the line
        return None
    if df.null_count().sum_horizontal().item() > 0:
        return None
    if df.height != data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1):
        return None  # blank lines or other oddities: let the strict path decide
    return df


def _reviews_strict(path: Path, data: bytes, bad: BadLines) -> pl.DataFrame:
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    for lineno, raw in enumerate(data.splitlines(), start=1):
        text = decode_line(path, lineno, raw, bad)
        if text is None:
            continue
        if not text.strip():
            bad.bad(path, lineno, "empty line; expected a JSON object")
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            bad.bad(path, lineno, f"malformed JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(rec, dict):
            bad.bad(path, lineno, f"expected a JSON object, got {type(rec).__name__}")
            continue
        missing = [k for k in REQUIRED_REVIEW_KEYS if rec.get(k) is None]
        if missing:
            bad.bad(path, lineno, f"missing required field(s) {missing}")
            continue
        t = rec["unixReviewTime"]
        if isinstance(t, bool) or not isinstance(t, int):
            bad.bad(path, lineno, f"unixReviewTime must be an integer, got {t!r}")
            continue
        users.append(str(rec["reviewerID"]))
        items.append(str(rec["asin"]))
        times.append(t)
    return pl.DataFrame(
        {"reviewerID": users, "asin": items, "unixReviewTime": times},
        schema={"reviewerID": pl.String, "asin": pl.String, "unixReviewTime": pl.Int64},
    )


def read_reviews(path: Path, bad: BadLines) -> pl.DataFrame:
    """Reviews file -> DataFrame(reviewerID, asin, unixReviewTime) in file order."""
    data = read_bytes(path, bad)
    if not data.strip():
        raise DataError(f"{path}: empty file; expected JSON lines of Amazon reviews")
    df = _reviews_fast(data)
    return df if df is not None else _reviews_strict(path, data, bad)


class _NotJson(Exception):
    pass


def _json_escape(m: re.Match) -> str:
    if m.group(1) is None:  # a bare double quote inside a single-quoted string
        return '\\"'
    out = _SAME_ESCAPES.get(m.group(1))
    if out is None:  # \x, \u, \N{}, octal, unknown escapes: left to ast
        raise _NotJson
    return out


def _json_string(m: re.Match) -> str:
    inner = m.group(1)
    if inner is None:  # "...": already JSON unless it has escapes
        inner = m.group(2)
        if "\\" not in inner:
            return m.group(0)
    elif "\\" not in inner and '"' not in inner:
        return f'"{inner}"'
    return '"' + _ESCAPE.sub(_json_escape, inner) + '"'


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a Python literal")


def parse_literal(text: str) -> object:
    """`ast.literal_eval(text)`, several times faster for the usual meta line.

    A left-to-right scan finds every Python string token ('...' or "...", escapes included),
    rewritten as a JSON string of the same value (only escapes meaning the same in both; others
    leave the line to ast). Then the line is JSON exactly when it is a Python literal of dicts,
    lists, strings and numbers, with the same value: JSON's grammar is a subset of Python's
    literals, and JSON's own words (true/false/null/NaN/Infinity), which Python lacks, are
    refused. Anything else (True/None, tuples, prefixed strings, code) goes to
    `ast.literal_eval`, which also phrases the errors.
    """
    try:
        if '"' not in text and "\\" not in text:  # every quote delimits a string
            js = text.replace("'", '"')
        else:
            js = _STRING.sub(_json_string, text)
        if not ("true" in js or "false" in js or "null" in js) or not _JSON_WORD.search(
            _STRING.sub("", text)
        ):
            return json.loads(js, parse_constant=_no_constant)
    except (_NotJson, ValueError):
        pass
    return ast.literal_eval(text)


def read_meta_categories(path: Path, wanted: set[str], bad: BadLines) -> tuple[dict[str, str], int]:
    """asin -> category (last entry of the last category path) for the `wanted` items.

    Only lines whose asin is wanted are parsed (`parse_literal`, i.e. `ast.literal_eval`): the
    full meta file lists every item of the category, most of which are not in the 5-core reviews.
    """
    data = read_bytes(path, bad)
    if not data.strip():
        raise DataError(f"{path}: empty file; expected Python-literal lines of Amazon item meta")
    cates: dict[str, str] = {}
    used = 0
    for lineno, raw in enumerate(data.splitlines(), start=1):
        m = _ASIN_RE.search(raw)
        if m is not None and m.group(1).decode("utf-8", "replace") not in wanted:
            continue
        text = decode_line(path, lineno, raw, bad)
        if text is None:
            continue
        if not text.strip():
            continue
        try:
            rec = parse_literal(text)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
            bad.bad(path, lineno, f"not a Python literal ({type(e).__name__}: {e})")
            continue
        if not isinstance(rec, dict) or "asin" not in rec:
            bad.bad(path, lineno, "expected a dict literal with an 'asin' key")
            continue
        asin = str(rec["asin"])
        if asin not in wanted:
            continue
        used += 1
        paths = rec.get("categories") or []
        if paths and isinstance(paths[-1], (list, tuple)) and paths[-1]:
            cates[asin] = str(paths[-1][-1])
    return cates, used


def read_amazon(
    reviews_path: Path | str,
    meta_path: Path | str | None,
    *,
    on_bad_line: str = "error",
) -> tuple[pl.DataFrame, AmazonReport]:
    """Reads one Amazon category into the canonical events table.

    Args:
        reviews_path: `reviews_<Category>_5.json[.gz]`.
        meta_path: `meta_<Category>.json[.gz]`, or None to give every item the unknown category.
        on_bad_line: `error` or `skip` (skipped lines are counted in the report).

    Returns:
        Events with columns user_id, item_id, cate_id (str), timestamp (int64 seconds),
        behavior (int8, always 1 = review), in file order; and the reader's report.
    """
    reviews_path = Path(reviews_path)
    bad = BadLines(on_bad_line)
    rev = read_reviews(reviews_path, bad)
    if rev.height == 0:
        raise DataError(f"{reviews_path}: no usable review lines")
    items = set(rev["asin"].unique().to_list())
    cates: dict[str, str] = {}
    used = 0
    if meta_path is not None:
        cates, used = read_meta_categories(Path(meta_path), items, bad)
    cate_map = pl.DataFrame(
        {"asin": list(cates), "cate_id": list(cates.values())},
        schema={"asin": pl.String, "cate_id": pl.String},
    )
    events = rev.join(cate_map, on="asin", how="left", maintain_order="left").select(
        pl.col("reviewerID").alias("user_id"),
        pl.col("asin").alias("item_id"),
        pl.col("cate_id").fill_null(UNKNOWN_CATE),
        pl.col("unixReviewTime").alias("timestamp"),
        pl.lit(REVIEW_BEHAVIOR, dtype=pl.Int8).alias("behavior"),
    )
    report = AmazonReport(
        reviews=events.height,
        users=int(events["user_id"].n_unique()),
        items=len(items),
        items_without_meta=len(items) - len(cates),
        meta_lines_used=used,
        bad_lines=dict(bad.counts),
    )
    return events, report


class AmazonSource:
    """An Amazon 2014 category on disk, as the data module sees it.

    Args:
        raw_dir: folder holding the reviews and meta files.
        category: the file-name category, e.g. `Electronics`.
        download_word: the `seqrank.data.download` dataset name shown when files are absent.
        use_meta: read categories from the meta file (otherwise every item is unknown).
    """

    unknown_cate_name = UNKNOWN_CATE

    def __init__(
        self,
        *,
        raw_dir: str | Path,
        category: str,
        download_word: str | None = None,
        use_meta: bool = True,
    ) -> None:
        self.raw_dir = Path(raw_dir)
        self.category = category
        self.download_word = download_word
        self.use_meta = use_meta

    def paths(self) -> tuple[Path, Path | None]:
        reviews, meta = amazon_paths(self.raw_dir, self.category)
        return reviews, (meta if self.use_meta else None)

    def prepare(self) -> None:
        check_amazon_files(*self.paths(), self.download_word)

    def fingerprint(self) -> dict:
        from seqrank.data.store import file_signature

        return {
            "source": "amazon",
            "category": self.category,
            "files": [file_signature(p) for p in self.paths() if p is not None],
        }

    def read(self, on_bad_line: str = "error") -> tuple[pl.DataFrame, dict]:
        events, report = read_amazon(*self.paths(), on_bad_line=on_bad_line)
        return events, report.__dict__

    def oracle(self):  # noqa: ANN201 - real data has no oracle
        return None
