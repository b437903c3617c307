"""SeqDataModule: raw source -> processed store (built once, atomically) -> index-batch loaders."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from seqrank.data.batching import BatchGatherDataset, IndexBatchSampler
from seqrank.data.errors import ON_BAD_LINE
from seqrank.data.preprocess import check_protocol, preprocess
from seqrank.data.store import Store, ensure_store, fingerprint, load_store, write_store
from seqrank.data.types import Schema

log = logging.getLogger(__name__)


class SeqDataModule(L.LightningDataModule):
    """Behaviour-sequence ranking data for any raw source.

    Args:
        source: a source object (`AmazonSource`, `SyntheticAmazonSource`, ...) with
            `prepare()`, `fingerprint()`, `read(on_bad_line)`, `oracle()` and `unknown_cate_name`.
        name: dataset name; the store lives in `<processed_dir>/<name>-<fingerprint>`.
        processed_dir: root folder of processed stores.
        protocol: `loo` (default), `paper` or `time` (DESIGN.md section 5). `time` splits at the
            source's `split_times()` (Taobao: the window's last two days) when it has one.
        max_len: history length L cut at batch time (not part of the store).
        batch_size: training batch size per process.
        eval_batch_size: validation/test batch size per process.
        num_workers: DataLoader workers (0: gather in the main process; it is vectorised).
        seed: seed of negative sampling and of the training order.
        on_bad_line: `error` or `skip` for malformed raw lines.
        target_behaviors: names (from the source's `behavior_names`) a target may have, e.g.
            `[buy]`; None (default) = every behaviour. Histories always hold every behaviour.
    """

    def __init__(
        self,
        source: Any,
        *,
        name: str,
        processed_dir: str | Path,
        protocol: str = "loo",
        max_len: int = 20,
        batch_size: int = 256,
        eval_batch_size: int = 2048,
        num_workers: int = 0,
        seed: int = 0,
        on_bad_line: str = "error",
        target_behaviors: list[str] | tuple[str, ...] | None = None,
    ) -> None:
        super().__init__()
        check_protocol(protocol)
        if on_bad_line not in ON_BAD_LINE:
            raise ValueError(f"data.on_bad_line={on_bad_line!r}; expected one of {list(ON_BAD_LINE)}")
        for key, value in (("max_len", max_len), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{key}={value!r}; expected an integer >= 1")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers}; expected >= 0")
        self.source = source
        self.name = name
        self.processed_dir = Path(processed_dir)
        self.protocol = protocol
        self.max_len = max_len
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.on_bad_line = on_bad_line
        self.target_behaviors = target_behavior_ids(target_behaviors, self.behavior_names)
        self.store: Store | None = None

    @property
    def behavior_names(self) -> tuple[str, ...]:
        return tuple(getattr(self.source, "behavior_names", ("review",)))

    # -- the store -------------------------------------------------------------------------
    def fingerprint(self) -> str:
        parts = {"source": self.source.fingerprint(), "protocol": self.protocol,
                 "seed": self.seed, "on_bad_line": self.on_bad_line}
        if self.target_behaviors is not None:  # absent when every behaviour is a target
            parts["target_behaviors"] = list(self.target_behaviors)
        return fingerprint(parts)

    def _split_times(self) -> tuple[int, int] | None:
        get = getattr(self.source, "split_times", None)
        return get() if self.protocol == "time" and get is not None else None

    def _build(self, final: Path) -> None:
        log.info("building processed store %s", final)
        events, read_report = self.source.read(on_bad_line=self.on_bad_line)
        p = preprocess(events, protocol=self.protocol, seed=self.seed,
                       unknown_cate_name=getattr(self.source, "unknown_cate_name", None),
                       target_behaviors=self.target_behaviors, split_times=self._split_times())
        splits = {k: v for k, v in p.splits.items()}
        schema = Schema(
            name=self.name,
            num_users=len(p.ids["user"]),
            num_items=len(p.ids["item"]),
            num_cates=len(p.ids["cate"]),
            # every named behaviour gets a row, also one absent from a small sample
            num_behaviors=max(int(p.events.behavior.max()), len(self.behavior_names)) + 1,
            behavior_names=self.behavior_names,
            protocol=self.protocol,
            split_sizes={k: len(v) for k, v in splits.items()},
            unknown_cate=p.unknown_cate,
        )
        oracle = self.source.oracle()
        kw = {"target_behaviors": self.target_behaviors} if self.target_behaviors is not None else {}
        scores = {k: oracle.score(p.events, p.ids["item"], v, **kw) for k, v in splits.items()} if oracle else None
        meta = {"fingerprint": self.fingerprint(), "source": self.source.fingerprint(),
                "reader": read_report, "preprocess": p.report, "seed": self.seed}
        write_store(final, schema=schema, meta=meta, events=p.events, splits=splits, ids=p.ids, oracle=scores)

    def store_path(self) -> Path:
        return self.processed_dir / f"{self.name}-{self.fingerprint()[:12]}"

    def prepare_data(self) -> None:
        """Makes sure raw files exist (or are generated) and the store is built, once."""
        self.source.prepare()
        ensure_store(self.processed_dir, self.name, self.fingerprint(), self._build)

    def setup(self, stage: str | None = None) -> None:
        if self.store is None:
            path = self.store_path()
            if not (path / "meta.json").exists():  # e.g. setup() called without prepare_data()
                self.prepare_data()
            self.store = load_store(path)

    @property
    def schema(self) -> Schema:
        if self.store is None:
            raise RuntimeError("SeqDataModule.schema is known after setup()")
        return self.store.schema

    # -- loaders ---------------------------------------------------------------------------
    def eval_split(self, stage: str) -> str:
        """`paper` has no validation split: validation runs on test, as the papers did."""
        if stage == "val" and "val" not in self.store.splits:
            return "test"
        return stage

    def _loader(self, split: str, *, train: bool) -> DataLoader:
        assert self.store is not None, "call setup() first"
        samples = self.store.splits[split]
        rank, world = 0, 1
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        sampler = IndexBatchSampler(
            len(samples),
            self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            seed=self.seed,
            rank=rank,
            world_size=world,
        )
        return DataLoader(
            BatchGatherDataset(self.store.events, samples, self.max_len),
            batch_size=None,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_split("val"), train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def split_arrays(self, split: str) -> tuple[np.ndarray, ...]:
        s = self.store.splits[split]
        return s.user, s.pos, s.target, s.label


def target_behavior_ids(names: list[str] | tuple[str, ...] | None, behavior_names: tuple[str, ...]) -> tuple[int, ...] | None:
    """Behaviour names -> ids 1..K (sorted); None when `names` is None or names every behaviour."""
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    names = list(names)
    unknown = [n for n in names if n not in behavior_names]
    if unknown or not names:
        raise ValueError(f"data.target_behaviors={names}; expected a non-empty subset of {list(behavior_names)}")
    ids = tuple(sorted({behavior_names.index(n) + 1 for n in names}))
    return None if len(ids) == len(behavior_names) else ids
