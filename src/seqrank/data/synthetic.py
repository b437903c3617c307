"""Synthetic Amazon-format data with a planted, learnable sequential signal and its oracle.

`generate_amazon` writes `reviews_<name>_5.json.gz` (strict JSON lines, sorted by item like the
real file, `reviewerName` sometimes missing) and `meta_<name>.json.gz` (Python-literal dicts,
some fields and a few whole items missing), deterministic by seed. The files then go through the
same reader and preprocessing as real data.

The generative process, per user, event k+1 after a gap of d whole days (d >= 1, no same-day
ties, so time order is unambiguous):
    complement  p = p_complement_recent if d <= recent_days else p_complement_stale:
                category from the complements of the last item's category (phone -> case)
    taste       p_taste: a category drawn from the user's last `taste_window` events
    noise       p_noise: a uniformly random item
    global      the rest: category by global (Zipf) popularity
then an item of the chosen category by within-category Zipf popularity; items are never
repeated by a user (5-core Amazon users rarely re-review). `AmazonOracle.score` evaluates the
exact probability of a candidate under this process given the observed history, i.e. the best
score any model that sees the history can reach.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from seqrank.data.batching import EventArrays, SampleArrays

DAY = 86400
_ALNUM = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
_WORDS = [
    "good",
    "great",
    "fine",
    "works",
    "cable",
    "case",
    "phone",
    "charger",
    "battery",
    "screen",
    "sound",
    "light",
    "fast",
    "cheap",
    "solid",
]


@dataclass(frozen=True)
class SyntheticAmazonSpec:
    """Sizes and signal strengths of the synthetic dataset (all fields feed the fingerprint)."""

    num_users: int = 12000
    num_items: int = 1000
    num_cates: int = 40
    min_events: int = 5
    mean_events: float = 13.0
    max_events: int = 50
    zipf_item: float = 0.8
    zipf_cate: float = 0.3
    p_complement_recent: float = 0.8
    p_complement_stale: float = 0.0
    recent_days: int = 7
    p_taste: float = 0.1
    p_noise: float = 0.01
    taste_window: int = 20
    p_recent_gap: float = 0.75
    frac_items_without_meta: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "num_users",
            "num_items",
            "num_cates",
            "min_events",
            "max_events",
            "taste_window",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"data.source.spec.{name}={getattr(self, name)}; expected >= 1")
        if self.num_items < self.num_cates * 2:
            raise ValueError(
                f"num_items={self.num_items} must be at least 2 x num_cates={self.num_cates}"
            )
        for name in (
            "zipf_item",
            "zipf_cate",
            "p_complement_recent",
            "p_complement_stale",
            "p_taste",
            "p_noise",
            "p_recent_gap",
            "frac_items_without_meta",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"data.source.spec.{name}={getattr(self, name)}; expected >= 0")
        for name in ("p_recent_gap", "frac_items_without_meta"):
            if getattr(self, name) > 1:
                raise ValueError(f"data.source.spec.{name}={getattr(self, name)}; expected <= 1")
        for name in ("p_complement_recent", "p_complement_stale"):
            if getattr(self, name) + self.p_taste + self.p_noise > 1:
                raise ValueError(f"data.source.spec: {name} + p_taste + p_noise must be <= 1")
        if not self.min_events <= self.max_events <= self.num_items:
            raise ValueError(
                f"data.source.spec: need min_events={self.min_events} <= max_events={self.max_events}"
                f" <= num_items={self.num_items} (users never repeat an item)"
            )


class AmazonOracle:
    """The generator's exact conditional probability of the next item (see module docstring)."""

    def __init__(
        self,
        spec: SyntheticAmazonSpec,
        asins: np.ndarray,
        item_cate: np.ndarray,
        item_w: np.ndarray,
        comp: np.ndarray,
        catpop: np.ndarray,
    ) -> None:
        self.spec, self.asins, self.item_cate = spec, asins, item_cate
        self.item_w, self.comp, self.catpop = item_w, comp, catpop

    @classmethod
    def build(cls, spec: SyntheticAmazonSpec) -> AmazonOracle:
        rng = np.random.default_rng([spec.seed, 1])
        n_items, C = spec.num_items, spec.num_cates
        item_cate = np.concatenate(
            [np.arange(C), rng.integers(0, C, n_items - C)]
        )  # every cate used
        rng.shuffle(item_cate)
        item_w = np.zeros(n_items)
        for c in range(C):  # Zipf within each category, random rank order
            members = np.flatnonzero(item_cate == c)
            w = 1.0 / np.arange(1, len(members) + 1) ** spec.zipf_item
            item_w[rng.permutation(members)] = w / w.sum()
        catpop = 1.0 / np.arange(1, C + 1) ** spec.zipf_cate
        catpop = catpop[rng.permutation(C)] / catpop.sum()
        comp = np.zeros((C, C))
        for c in range(C):  # two complements per category: phone -> case (0.7), charger (0.3)
            a, b = rng.choice(np.delete(np.arange(C), c), 2, replace=False)
            comp[c, a], comp[c, b] = 0.7, 0.3
        asins = np.array(["B" + "".join(rng.choice(_ALNUM, 9)) for _ in range(n_items)])
        return cls(spec, asins, item_cate, item_w, comp, catpop)

    def p_complement(self, gap_days: np.ndarray) -> np.ndarray:
        s = self.spec
        return np.where(gap_days <= s.recent_days, s.p_complement_recent, s.p_complement_stale)

    def score(self, events: EventArrays, item_raw: np.ndarray, samples: SampleArrays) -> np.ndarray:
        """Oracle probability of each sample's target given the user's observed history.

        Args:
            events: the store's events (processed ids).
            item_raw: raw asin by processed item id (index 0 = padding).
            samples: the split's samples.

        Returns:
            (S,) float64 probabilities (higher = more likely the observed next item).
        """
        s = self.spec
        gen_of = {a: i for i, a in enumerate(self.asins)}
        to_gen = np.array([gen_of.get(a, -1) for a in item_raw], dtype=np.int64)
        if (to_gen[1:] < 0).any():
            raise ValueError("store items are not from this generator (unknown asins)")
        ev_item = to_gen[events.item]  # (N,) generator ids
        ev_cate = self.item_cate[ev_item]
        C = s.num_cates
        # consumed mass per category before each event: cumsum of one-hot(cate) * w per user
        onehot = np.zeros((len(ev_item) + 1, C))
        onehot[np.arange(1, len(ev_item) + 1), ev_cate] = self.item_w[ev_item]
        cum = np.cumsum(onehot, axis=0)  # cum[k] = mass of events[:k]
        start = events.user_offsets[samples.user].astype(np.int64)
        at = start + samples.pos  # index of the target event
        tgt = to_gen[samples.target]
        tc = self.item_cate[tgt]
        consumed = cum[at, tc] - cum[start, tc]
        last_c = ev_cate[at - 1]
        gap_days = (events.ts[at] - events.ts[at - 1]) // DAY
        W = s.taste_window
        lo = np.maximum(samples.pos - W, 0)
        offs = np.arange(W)
        win = samples.pos[:, None] - W + offs  # (S, W) positions in the window
        valid = win >= lo[:, None]
        cates_win = np.where(valid, ev_cate[np.where(valid, start[:, None] + win, 0)], -1)
        taste = (cates_win == tc[:, None]).sum(1) / np.maximum(valid.sum(1), 1)
        pc = self.p_complement(gap_days)
        pg = 1.0 - pc - s.p_taste - s.p_noise
        p_cate = pc * self.comp[last_c, tc] + s.p_taste * taste + pg * self.catpop[tc]
        p_item = p_cate * self.item_w[tgt] / np.maximum(1.0 - consumed, 1e-12)
        return p_item + s.p_noise / (s.num_items - samples.pos)

    def save(self, path: Path) -> None:
        np.savez(
            path,
            asins=self.asins,
            item_cate=self.item_cate,
            item_w=self.item_w,
            comp=self.comp,
            catpop=self.catpop,
            spec=json.dumps(asdict(self.spec)),
        )

    @classmethod
    def load(cls, path: Path) -> AmazonOracle:
        z = np.load(path)
        spec = SyntheticAmazonSpec(**json.loads(str(z["spec"])))
        return cls(spec, z["asins"], z["item_cate"], z["item_w"], z["comp"], z["catpop"])


def _draw(rng: np.random.Generator, cdf: np.ndarray, members: np.ndarray, used: set[int]) -> int:
    for _ in range(64):
        i = int(members[min(np.searchsorted(cdf, rng.random()), len(members) - 1)])
        if i not in used:
            return i
    return -1


def simulate(oracle: AmazonOracle) -> list[tuple[int, int, int]]:
    """Runs the generative process; returns (user, generator item, day) events in time order."""
    s = oracle.spec
    rng = np.random.default_rng([s.seed, 2])
    n_items, C = s.num_items, s.num_cates
    members = [np.flatnonzero(oracle.item_cate == c) for c in range(C)]
    cdfs = [np.cumsum(oracle.item_w[m]) for m in members]
    comp_cdf = np.cumsum(oracle.comp, axis=1)
    cat_cdf = np.cumsum(oracle.catpop)
    extra = max(s.mean_events - s.min_events, 0.0)
    lengths = np.minimum(
        s.min_events + rng.geometric(1.0 / (extra + 1.0), s.num_users) - 1, s.max_events
    )
    first_day = rng.integers(14000, 15900, s.num_users)  # 2008-05 .. 2013-07
    out = []
    for u in range(s.num_users):
        used: set[int] = set()
        hist_c: list[int] = []
        day = int(first_day[u])
        for k in range(int(lengths[u])):
            gap = 0
            if k:
                recent = rng.random() < s.p_recent_gap
                gap = int(rng.integers(1, 4)) if recent else int(8 + rng.geometric(1 / 60))
                day += gap
            r = rng.random()
            pc = (
                (s.p_complement_recent if gap <= s.recent_days else s.p_complement_stale)
                if k
                else 0.0
            )
            pt = s.p_taste if k else 0.0
            item = -1
            if r < s.p_noise:
                pass
            elif r < s.p_noise + pc:
                c = int(np.searchsorted(comp_cdf[hist_c[-1]], rng.random()))
                item = _draw(rng, cdfs[c], members[c], used)
            elif r < s.p_noise + pc + pt:
                window = hist_c[-s.taste_window :]
                c = window[int(rng.integers(0, len(window)))]
                item = _draw(rng, cdfs[c], members[c], used)
            else:
                c = min(int(np.searchsorted(cat_cdf, rng.random())), C - 1)
                item = _draw(rng, cdfs[c], members[c], used)
            while item < 0 or item in used:  # noise, or a category the user has exhausted
                item = int(rng.integers(0, n_items))
            used.add(item)
            hist_c.append(int(oracle.item_cate[item]))
            out.append((u, item, day))
    return out


@contextlib.contextmanager
def _gzip_text(path: Path) -> Iterator[io.TextIOWrapper]:
    """A gzip text writer with a zero header mtime, so equal specs give byte-identical files."""
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
        io.TextIOWrapper(gz, encoding="utf-8") as f,
    ):
        yield f


def _review_time(day: int) -> str:
    d = np.datetime64(day, "D").astype(object)
    return f"{d.month:02d} {d.day}, {d.year}"


def generate_amazon(
    out_dir: Path | str, spec: SyntheticAmazonSpec, *, name: str = "Synthetic"
) -> tuple[Path, Path, Path]:
    """Writes reviews, meta and the oracle for `spec` into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    oracle = AmazonOracle.build(spec)
    events = simulate(oracle)
    rng = np.random.default_rng([spec.seed, 3])
    users = ["A" + "".join(rng.choice(_ALNUM, 13)) for _ in range(spec.num_users)]
    cate_names = [f"Cat{c:03d}" for c in range(spec.num_cates)]
    reviews = out_dir / f"reviews_{name}_5.json.gz"
    meta = out_dir / f"meta_{name}.json.gz"
    order = sorted(range(len(events)), key=lambda k: (oracle.asins[events[k][1]], events[k][2]))
    tmp = reviews.with_suffix(".tmp")
    with _gzip_text(tmp) as f:
        for k in order:
            u, i, day = events[k]
            rec = {"reviewerID": users[u], "asin": str(oracle.asins[i])}
            if k % 17:  # reviewerName is optional in the real files
                rec["reviewerName"] = f"user {users[u][-4:].lower()}"
            rec |= {
                "helpful": [k % 5, k % 7],
                "reviewText": " ".join(_WORDS[(k + j) % len(_WORDS)] for j in range(8)),
                "overall": float(1 + k % 5),
                "summary": _WORDS[k % len(_WORDS)].title(),
                "unixReviewTime": day * DAY,
                "reviewTime": _review_time(day),
            }
            f.write(json.dumps(rec) + "\n")
    tmp.replace(reviews)
    tmp = meta.with_suffix(".tmp")
    no_meta = rng.random(spec.num_items) < spec.frac_items_without_meta
    with _gzip_text(tmp) as f:
        for i in range(spec.num_items):
            if no_meta[i]:
                continue
            rec: dict = {"asin": str(oracle.asins[i])}
            if i % 3:
                rec["title"] = f'Item {i} it\'s "great"'
            if i % 4:
                rec["price"] = round(5 + (i * 7.31) % 200, 2)
            rec["related"] = {"also_bought": [str(oracle.asins[(i + 1) % spec.num_items])]}
            if i % 5:
                rec["salesRank"] = {"Electronics": int(i * 13 % 100000)}
            c = cate_names[oracle.item_cate[i]]
            rec["categories"] = [
                ["Electronics", "Accessories"],
                ["Electronics", f"Group{oracle.item_cate[i] % 5}", c],
            ]
            f.write(repr(rec) + "\n")  # Python literal, as in the real meta files
    tmp.replace(meta)
    oracle_path = out_dir / f"oracle_{name}.npz"
    oracle.save(oracle_path)
    return reviews, meta, oracle_path


class SyntheticAmazonSource:
    """The embedded synthetic dataset: generated once into `raw_dir`, then read like real data.

    Args:
        raw_dir: where the generated raw files go.
        spec: `SyntheticAmazonSpec` fields (sizes, signal strengths, seed).
        name: the category word in the file names.
    """

    def __init__(
        self, *, raw_dir: str | Path, spec: dict | None = None, name: str = "Synthetic"
    ) -> None:
        from seqrank.data.sources.amazon import UNKNOWN_CATE

        self.spec = SyntheticAmazonSpec(**dict(spec or {}))
        self.raw_dir = Path(raw_dir) / _spec_tag(self.spec)
        self.name = name
        self.unknown_cate_name = UNKNOWN_CATE

    def paths(self) -> tuple[Path, Path, Path]:
        return (
            self.raw_dir / f"reviews_{self.name}_5.json.gz",
            self.raw_dir / f"meta_{self.name}.json.gz",
            self.raw_dir / f"oracle_{self.name}.npz",
        )

    def prepare(self) -> None:
        from filelock import FileLock

        if all(p.exists() for p in self.paths()):
            return
        self.raw_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.raw_dir / ".generate.lock")):
            if not all(p.exists() for p in self.paths()):
                generate_amazon(self.raw_dir, self.spec, name=self.name)

    def fingerprint(self) -> dict:
        # The files are a pure function of the spec, so the spec identifies them.
        return {"source": "synthetic_amazon", "spec": asdict(self.spec), "name": self.name}

    def read(self, on_bad_line: str = "error") -> tuple:
        from seqrank.data.sources.amazon import read_amazon

        reviews, meta, _ = self.paths()
        events, report = read_amazon(reviews, meta, on_bad_line=on_bad_line)
        return events, report.__dict__

    def oracle(self) -> AmazonOracle:
        return AmazonOracle.load(self.paths()[2])


def _spec_tag(spec: SyntheticAmazonSpec) -> str:
    import hashlib

    return (
        "synthetic-"
        + hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:10]
    )
