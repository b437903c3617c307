"""Tianchi UserBehavior (Taobao, 2017-11-25 .. 2017-12-03): one CSV of pv/cart/fav/buy events.

`UserBehavior.csv` has no header and five integer-or-word columns,
`user_id,item_id,category_id,behavior_type,timestamp`, behaviour one of `pv|cart|fav|buy`; users
run in lexicographic order, each user's rows in time order. The full file is 100,150,807 rows
(3.5 GB), so it is read with polars' lazy `scan_csv` and the streaming engine: `read_taobao`
holds the kept events (not the text) in memory; `scan_taobao` checks the file in one streaming
pass and returns the events lazily, for the out-of-core preprocessing (memory bounded, not
growing with the file). Rows outside the dataset window (Beijing time, UTC+8, default
[2017-11-25 00:00, 2017-12-04 00:00)) are dirty rows of the real file: dropped and counted.

Reading takes two paths. The fast one parses typed columns (behaviour as an Enum) and checks a
one-row summary (nulls, counts); any parse error or null sends the file to the precise one,
which reads each line as a string with its line number, splits it in polars (still streaming)
and names the file and line of every bad row: `DataError` under `on_bad_line=error`, skipped and
counted under `skip`. A line polars cannot even split falls back to a plain Python loop.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from seqrank.data.errors import BadLines, DataError, MissingDataError

BEHAVIORS = ("pv", "cart", "fav", "buy")  # behaviour id = index + 1 (0 is padding)
COLUMNS = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
INT_COLUMNS = ("user_id", "item_id", "category_id", "timestamp")
FILENAME = "UserBehavior.csv"
BEIJING = dt.timezone(dt.timedelta(hours=8))
DAY = 86400
# [2017-11-25 00:00, 2017-12-04 00:00) Beijing time, the dataset's documented window.
WINDOW = (1511539200, 1512316800)

_BEHAVIOR_ENUM = pl.Enum(list(BEHAVIORS))
_FAST_SCHEMA = {
    "user_id": pl.Int64,
    "item_id": pl.Int64,
    "category_id": pl.Int64,
    "behavior_type": _BEHAVIOR_ENUM,
    "timestamp": pl.Int64,
}
_EXPECTED = "5 comma-separated fields user_id,item_id,category_id,behavior_type,timestamp"


@dataclass
class TaobaoReport:
    """What the reader saw; goes into the store's meta.json.

    `rows` counts every data line; `behaviors` counts the valid rows before the window filter;
    `users`/`items`/`cates` are distinct ids of the kept events (None from `scan_taobao`: the
    pass that reads the lazy table counts them).
    """

    rows: int = 0
    rows_bad: int = 0
    rows_out_of_window: int = 0
    events: int = 0
    users: int | None = 0
    items: int | None = 0
    cates: int | None = 0
    behaviors: dict[str, int] = field(default_factory=dict)
    window: tuple[int, int] | None = WINDOW
    bad_lines: dict[str, int] = field(default_factory=dict)
    bad_examples: list[str] = field(default_factory=list)
    path: str = "fast"  # which reading path ran: fast, precise or python


def to_timestamp(value: int | str) -> int:
    """Unix seconds from an int or an ISO date/time string (naive strings are Beijing time)."""
    if isinstance(value, bool):
        raise ValueError(f"expected unix seconds or an ISO date string, got {value!r}")
    if isinstance(value, int):
        return value
    try:
        t = dt.datetime.fromisoformat(str(value))
    except ValueError:
        raise ValueError(
            f"{value!r}: expected unix seconds or an ISO date string like 2017-11-25T00:00+08:00"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=BEIJING)
    return int(t.timestamp())


def resolve_window(window: tuple[int | str, int | str] | list | None) -> tuple[int, int] | None:
    """(start, end) in unix seconds, start < end, or None for no filter."""
    if window is None:
        return None
    if len(window) != 2:
        raise ValueError(f"data.source.window={window!r}; expected [start, end] or null")
    start, end = (to_timestamp(v) for v in window)
    if start >= end:
        raise ValueError(f"data.source.window: start {start} must be before end {end}")
    return start, end


def check_taobao_file(path: Path, download_word: str | None) -> None:
    """Stops at once, naming the expected path and the download command, when the file is absent."""
    if not path.exists():
        hint = (
            f"see: python -m seqrank.data.download {download_word} --dest {path.parent}"
            " (Tianchi needs a login: the command explains the manual download)"
            if download_word
            else "place it there"
        )
        raise MissingDataError(f"raw Taobao file not found:\n  {path}\n{hint}")


def _in_window(window: tuple[int, int] | None) -> pl.Expr:
    if window is None:
        return pl.lit(True)
    return (pl.col("timestamp") >= window[0]) & (pl.col("timestamp") < window[1])


def _canonical(lf: pl.LazyFrame, behavior: pl.Expr) -> pl.LazyFrame:
    return lf.select(
        pl.col("user_id"),
        pl.col("item_id"),
        pl.col("category_id").alias("cate_id"),
        pl.col("timestamp"),
        behavior.cast(pl.Int8).alias("behavior"),
    )


def _fast(path: Path, window: tuple[int, int] | None) -> tuple[pl.LazyFrame, dict] | None:
    """Typed scan checked by a one-row summary; None when any row fails to parse or has a
    missing field. The events come back lazily (a second scan reads them)."""
    lf = pl.scan_csv(path, has_header=False, schema=_FAST_SCHEMA, quote_char=None)
    out = ~_in_window(window)
    try:
        summary = lf.select(
            pl.len().alias("rows"),
            pl.sum_horizontal(pl.all().null_count()).alias("nulls"),
            (out & pl.col("timestamp").is_not_null()).sum().alias("out"),
            *[(pl.col("behavior_type") == b).sum().alias(b) for b in BEHAVIORS],
        ).collect(engine="streaming")
    except pl.exceptions.PolarsError:
        return None
    s = summary.row(0, named=True)
    if s["nulls"]:
        return None
    events = _canonical(lf.filter(_in_window(window)), pl.col("behavior_type").to_physical() + 1)
    return events, {"rows": s["rows"], "out": s["out"], "behaviors": {b: s[b] for b in BEHAVIORS}}


def _parsed_lines(path: Path) -> pl.LazyFrame:
    """Each line as a string with its 1-based number, split and parsed; `ok` marks valid rows."""
    lines = pl.scan_csv(
        path,
        has_header=False,
        schema={"line": pl.String},
        separator="\x1f",  # a byte absent from the format: one field per line
        quote_char=None,
        encoding="utf8-lossy",
    ).with_row_index("lineno", offset=1)
    fields = pl.col("line").str.splitn(",", 5).struct.rename_fields(list(COLUMNS))
    parsed = lines.with_columns(
        (pl.col("line").str.count_matches(",", literal=True) + 1).alias("ncols"),
        fields.alias("f"),
    ).unnest("f")
    parsed = parsed.with_columns(
        *[pl.col(c).cast(pl.Int64, strict=False).alias(f"{c}_int") for c in INT_COLUMNS],
        pl.col("behavior_type").cast(_BEHAVIOR_ENUM, strict=False).alias("behavior_enum"),
    )
    ok = (
        pl.col("line").is_not_null()
        & (pl.col("ncols") == 5)
        & pl.all_horizontal(*[pl.col(f"{c}_int").is_not_null() for c in INT_COLUMNS])
        & pl.col("behavior_enum").is_not_null()
    )
    return parsed.with_columns(ok.alias("ok"))


def _reason(row: dict) -> str:
    if row["line"] is None or not row["line"].strip():
        return f"empty line; expected {_EXPECTED}"
    if row["ncols"] != 5:
        return f"{row['ncols']} fields; expected {_EXPECTED}: {row['line'][:80]!r}"
    for c in INT_COLUMNS:
        if row[f"{c}_int"] is None:
            return f"{c} is not an integer: {row[c]!r}"
    return f"unknown behaviour {row['behavior_type']!r}; expected one of {', '.join(BEHAVIORS)}"


def _precise(
    path: Path, window: tuple[int, int] | None, bad: BadLines
) -> tuple[pl.LazyFrame, dict]:
    """Line-numbered polars path: reports every bad line, keeps the valid in-window rows
    (lazily)."""
    parsed = _parsed_lines(path)
    cols = ["lineno", "line", "ncols", *COLUMNS, *[f"{c}_int" for c in INT_COLUMNS]]
    bad_rows = parsed.filter(~pl.col("ok")).select(cols)
    if bad.policy == "error":
        bad_rows = bad_rows.head(1)
    for row in bad_rows.collect(engine="streaming").iter_rows(named=True):
        bad.bad(path, int(row["lineno"]), _reason(row))
    good = parsed.filter(pl.col("ok")).select(
        *[pl.col(f"{c}_int").alias(c) for c in INT_COLUMNS],
        pl.col("behavior_enum").alias("behavior_type"),
    )
    summary = good.select(
        (~_in_window(window)).sum().alias("out"),
        *[(pl.col("behavior_type") == b).sum().alias(b) for b in BEHAVIORS],
    )
    rows = parsed.select(pl.len().alias("rows"))
    events = _canonical(good.filter(_in_window(window)), pl.col("behavior_type").to_physical() + 1)
    s, n = pl.collect_all([summary, rows], engine="streaming")
    s = s.row(0, named=True)
    return events, {
        "rows": int(n.item()),
        "out": s["out"],
        "behaviors": {b: s[b] for b in BEHAVIORS},
    }


def _python(path: Path, window: tuple[int, int] | None, bad: BadLines) -> tuple[pl.DataFrame, dict]:
    """Last resort when polars cannot split the lines (e.g. a stray 0x1f byte): a plain loop."""
    cols: dict[str, list[int]] = {c: [] for c in (*INT_COLUMNS, "behavior")}
    code = {b: i + 1 for i, b in enumerate(BEHAVIORS)}
    counts = dict.fromkeys(BEHAVIORS, 0)
    rows = out = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            rows += 1
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            parts = text.split(",")
            row = {
                "line": text,
                "ncols": len(parts),
                **dict(zip(COLUMNS, parts + [None] * 5, strict=False)),
            }
            if len(parts) == 5:
                for c in INT_COLUMNS:
                    try:
                        row[f"{c}_int"] = int(row[c])
                    except ValueError:
                        row[f"{c}_int"] = None
            if (
                len(parts) != 5
                or any(row[f"{c}_int"] is None for c in INT_COLUMNS)
                or parts[3] not in code
            ):
                bad.bad(path, lineno, _reason(row))
                continue
            counts[parts[3]] += 1
            ts = row["timestamp_int"]
            if window is not None and not window[0] <= ts < window[1]:
                out += 1
                continue
            for c in INT_COLUMNS:
                cols[c].append(row[f"{c}_int"])
            cols["behavior"].append(code[parts[3]])
    df = pl.DataFrame(
        {
            "user_id": cols["user_id"],
            "item_id": cols["item_id"],
            "cate_id": cols["category_id"],
            "timestamp": cols["timestamp"],
            "behavior": cols["behavior"],
        },
        schema={
            "user_id": pl.Int64,
            "item_id": pl.Int64,
            "cate_id": pl.Int64,
            "timestamp": pl.Int64,
            "behavior": pl.Int8,
        },
    )
    return df, {"rows": rows, "out": out, "behaviors": counts}


def _open(
    path: Path, win: tuple[int, int] | None, on_bad_line: str
) -> tuple[pl.LazyFrame, dict, BadLines, str]:
    """Checks the file (fast path, else the precise one, else the Python loop), applying the
    bad-line policy; returns the valid in-window events lazily, the counts, and the path taken."""
    bad = BadLines(on_bad_line)
    if not path.exists():
        raise MissingDataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file; expected CSV lines of {_EXPECTED}")
    how = "fast"
    got = _fast(path, win)
    if got is None:
        how = "precise"
        try:
            got = _precise(path, win, bad)
        except pl.exceptions.PolarsError:
            how, bad = "python", BadLines(on_bad_line)
            df, s = _python(path, win, bad)
            got = df.lazy(), s
    events, s = got
    s["events"] = sum(s["behaviors"].values()) - int(s["out"])  # valid rows in the window
    if s["events"] == 0:
        raise DataError(
            f"{path}: no usable rows ({s['rows']} lines, {bad.total} bad, {s['out']} outside the window {win})"
        )
    return events, s, bad, how


def _report(
    s: dict, bad: BadLines, how: str, win: tuple[int, int] | None, events: pl.DataFrame | None
) -> TaobaoReport:
    def distinct(col: str) -> int | None:
        return int(events[col].n_unique()) if events is not None else None

    return TaobaoReport(
        rows=s["rows"],
        rows_bad=bad.total,
        rows_out_of_window=int(s["out"]),
        events=events.height if events is not None else s["events"],
        users=distinct("user_id"),
        items=distinct("item_id"),
        cates=distinct("cate_id"),
        behaviors={b: int(v) for b, v in s["behaviors"].items()},
        window=win,
        bad_lines=dict(bad.counts),
        bad_examples=list(bad.examples),
        path=how,
    )


def read_taobao(
    path: Path | str,
    *,
    on_bad_line: str = "error",
    window: tuple[int | str, int | str] | None = WINDOW,
) -> tuple[pl.DataFrame, TaobaoReport]:
    """Reads UserBehavior.csv into the canonical events table.

    Args:
        path: the CSV (no header; `user_id,item_id,category_id,behavior_type,timestamp`).
        on_bad_line: `error` raises `DataError` naming file:line; `skip` drops and counts.
        window: keep rows with start <= timestamp < end (unix seconds or ISO strings, naive
            ones in Beijing time); None keeps every row.

    Returns:
        Events with columns user_id, item_id, cate_id (int64 raw ids), timestamp (int64
        seconds), behavior (int8: 1 pv, 2 cart, 3 fav, 4 buy), in file order; and the report.
    """
    path = Path(path)
    win = resolve_window(window)
    lazy, s, bad, how = _open(path, win, on_bad_line)
    try:
        events = lazy.collect(engine="streaming")
    except pl.exceptions.PolarsError as e:
        raise DataError(f"{path}: changed while being read ({e})") from None
    return events, _report(s, bad, how, win, events)


def scan_taobao(
    path: Path | str,
    *,
    on_bad_line: str = "error",
    window: tuple[int | str, int | str] | None = WINDOW,
) -> tuple[pl.LazyFrame, TaobaoReport]:
    """`read_taobao` without holding the events: the file is checked now (bad lines raise or
    are counted, as there) and the same events table comes back as a LazyFrame that re-scans
    the file, in file order. The report's users/items/cates are None (the caller counts them).
    """
    path = Path(path)
    win = resolve_window(window)
    lazy, s, bad, how = _open(path, win, on_bad_line)
    return lazy, _report(s, bad, how, win, None)


class TaobaoSource:
    """Tianchi UserBehavior on disk, as the data module sees it.

    Args:
        raw_dir: folder holding `UserBehavior.csv`.
        filename: the CSV's name inside `raw_dir`.
        download_word: the `seqrank.data.download` dataset name shown when the file is absent.
        window: [start, end) kept timestamps (unix seconds or ISO strings; naive = Beijing
            time); null keeps every row. The `time` protocol tests on the window's last day.
    """

    behavior_names = BEHAVIORS
    unknown_cate_name = None

    def __init__(
        self,
        *,
        raw_dir: str | Path,
        filename: str = FILENAME,
        download_word: str | None = "taobao",
        window: tuple[int | str, int | str] | list | None = WINDOW,
    ) -> None:
        self.raw_dir = Path(raw_dir)
        self.filename = filename
        self.download_word = download_word
        self.window = resolve_window(tuple(window) if window is not None else None)

    def path(self) -> Path:
        return self.raw_dir / self.filename

    def prepare(self) -> None:
        check_taobao_file(self.path(), self.download_word)

    def fingerprint(self) -> dict:
        from seqrank.data.store import file_signature

        return {"source": "taobao", "window": self.window, "files": [file_signature(self.path())]}

    def read(self, on_bad_line: str = "error") -> tuple[pl.DataFrame, dict]:
        self.prepare()
        events, report = read_taobao(self.path(), on_bad_line=on_bad_line, window=self.window)
        return events, report.__dict__

    def scan(self, on_bad_line: str = "error") -> tuple[pl.LazyFrame, dict]:
        """The events lazily (`scan_taobao`), for the out-of-core preprocessing."""
        self.prepare()
        events, report = scan_taobao(self.path(), on_bad_line=on_bad_line, window=self.window)
        return events, report.__dict__

    def split_times(self) -> tuple[int, int] | None:
        """(val_start, test_start) of the `time` protocol: the window's last two days."""
        return split_times(self.window)

    def oracle(self):  # noqa: ANN201 - real data has no oracle
        return None


def split_times(window: tuple[int, int] | None) -> tuple[int, int] | None:
    """The day before the window's last day starts validation, the last day starts test."""
    if window is None:
        return None
    return window[1] - 2 * DAY, window[1] - DAY
