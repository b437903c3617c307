"""SeqDataModule: raw source -> processed store (built once, atomically) -> index-batch loaders."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from seqrank.data.batching import (
    BatchGatherDataset,
    DeviceGatherDataset,
    IndexBatchSampler,
    to_device,
)
from seqrank.data.errors import ON_BAD_LINE
from seqrank.data.preprocess import check_protocol, preprocess, preprocess_chunked
from seqrank.data.store import (
    Store,
    StoreWriter,
    ensure_store,
    fingerprint,
    load_arrays,
    load_store,
    store_meta,
    write_store,
)
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
        chunk_rows: sources that can be scanned lazily (`scan(on_bad_line)`, e.g. Taobao) are
            preprocessed out of core in ranges of about this many events, which bounds memory;
            None reads them whole. The store does not depend on it (not in the fingerprint).
        device_store: hold the store's arrays on the training device (the GPU) and gather
            batches there, instead of gathering on the host and copying each batch; needs
            num_workers=0. Batches are the same either way. True = the trainer's device; a
            device name (`cuda:0`) names it.
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
        chunk_rows: int | None = 2_000_000,
        device_store: bool | str = False,
    ) -> None:
        super().__init__()
        check_protocol(protocol)
        if on_bad_line not in ON_BAD_LINE:
            raise ValueError(
                f"data.on_bad_line={on_bad_line!r}; expected one of {list(ON_BAD_LINE)}"
            )
        for key, value in (
            ("max_len", max_len),
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{key}={value!r}; expected an integer >= 1")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers}; expected >= 0")
        if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
            raise ValueError(f"data.chunk_rows={chunk_rows!r}; expected an integer >= 1 or null")
        if device_store and num_workers != 0:
            raise ValueError(
                f"data.device_store=true gathers batches on the device in the main process; "
                f"data.num_workers={num_workers} must be 0 with it"
            )
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
        self.chunk_rows = chunk_rows
        self.device_store = device_store
        self._device_events: tuple[torch.device, dict[str, torch.Tensor]] | None = None
        self.store: Store | None = None

    @property
    def behavior_names(self) -> tuple[str, ...]:
        return tuple(getattr(self.source, "behavior_names", ("review",)))

    # -- the store -------------------------------------------------------------------------
    def fingerprint(self) -> str:
        parts = {
            "source": self.source.fingerprint(),
            "protocol": self.protocol,
            "seed": self.seed,
            "on_bad_line": self.on_bad_line,
        }
        if self.target_behaviors is not None:  # absent when every behaviour is a target
            parts["target_behaviors"] = list(self.target_behaviors)
        return fingerprint(parts)

    def _split_times(self) -> tuple[int, int] | None:
        get = getattr(self.source, "split_times", None)
        return get() if self.protocol == "time" and get is not None else None

    def _schema(
        self,
        vocab_sizes: dict[str, int],
        max_behavior: int,
        split_sizes: dict[str, int],
        unknown_cate: int,
    ) -> Schema:
        return Schema(
            name=self.name,
            num_users=vocab_sizes["user"],
            num_items=vocab_sizes["item"],
            num_cates=vocab_sizes["cate"],
            # every named behaviour gets a row, also one absent from a small sample
            num_behaviors=max(max_behavior, len(self.behavior_names)) + 1,
            behavior_names=self.behavior_names,
            protocol=self.protocol,
            split_sizes=split_sizes,
            unknown_cate=unknown_cate,
        )

    def _meta(self, read_report: dict, preprocess_report: dict) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint(),
            "source": self.source.fingerprint(),
            "reader": read_report,
            "preprocess": preprocess_report,
            "seed": self.seed,
        }

    def _oracle_scores(
        self, events, item_ids: np.ndarray, splits: dict
    ) -> dict[str, np.ndarray] | None:  # noqa: ANN001
        oracle = self.source.oracle()
        if not oracle:
            return None
        kw = (
            {"target_behaviors": self.target_behaviors} if self.target_behaviors is not None else {}
        )
        return {k: oracle.score(events, item_ids, v, **kw) for k, v in splits.items()}

    def _build(self, final: Path) -> None:
        log.info("building processed store %s", final)
        if self.chunk_rows is not None and callable(getattr(self.source, "scan", None)):
            return self._build_chunked(final)
        events, read_report = self.source.read(on_bad_line=self.on_bad_line)
        p = preprocess(
            events,
            protocol=self.protocol,
            seed=self.seed,
            unknown_cate_name=getattr(self.source, "unknown_cate_name", None),
            target_behaviors=self.target_behaviors,
            split_times=self._split_times(),
        )
        del events
        splits = dict(p.splits)
        schema = self._schema(
            {k: len(v) for k, v in p.ids.items()},
            int(p.events.behavior.max()),
            {k: len(v) for k, v in splits.items()},
            p.unknown_cate,
        )
        scores = self._oracle_scores(p.events, p.ids["item"], splits)
        write_store(
            final,
            schema=schema,
            meta=self._meta(read_report, p.report),
            events=p.events,
            splits=splits,
            ids=p.ids,
            oracle=scores,
        )

    def _build_chunked(self, final: Path) -> None:
        """Out of core (`preprocess_chunked`): arrays go straight to the store's temp folder."""
        lazy, read_report = self.source.scan(on_bad_line=self.on_bad_line)
        with StoreWriter(final) as w:
            scratch = w.tmp / "_ranges"
            try:
                p = preprocess_chunked(
                    lazy,
                    w,
                    scratch,
                    protocol=self.protocol,
                    seed=self.seed,
                    chunk_rows=self.chunk_rows,
                    unknown_cate_name=getattr(self.source, "unknown_cate_name", None),
                    target_behaviors=self.target_behaviors,
                    split_times=self._split_times(),
                )
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            log.info(
                "preprocessed %d events in %d range(s) of <= ~%d",
                p.report["events"],
                p.chunks,
                self.chunk_rows,
            )
            # the reader leaves the counts of its (lazy) table to the pass that reads it
            read_report = {
                **read_report,
                **{k: v for k, v in p.input_counts.items() if read_report.get(k) is None},
            }
            w.close_appended()
            events, splits = load_arrays(w.tmp, list(p.split_sizes))
            scores = self._oracle_scores(events, np.load(w.tmp / "ids.item.npy"), splits)
            for split, sc in (scores or {}).items():
                w.save(f"{split}.oracle", sc)
            del events, splits
            schema = self._schema(p.vocab_sizes, p.max_behavior, p.split_sizes, p.unknown_cate)
            w.commit(
                store_meta(
                    self._meta(read_report, p.report),
                    schema,
                    list(p.split_sizes),
                    list(scores or {}),
                )
            )

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
        if train:
            self._train_sampler = sampler
        return (ResumableDataLoader if train else DataLoader)(
            self._dataset(samples),
            batch_size=None,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # its own generator: creating an iterator then draws no number from the global one
            # (dropout's), so a resumed run's draws continue exactly where the checkpoint left them
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _dataset(self, samples: Any) -> torch.utils.data.Dataset:
        if not self.device_store:
            return BatchGatherDataset(self.store.events, samples, self.max_len)
        if isinstance(self.device_store, str):
            device = torch.device(self.device_store)
        elif self.trainer is not None:
            device = self.trainer.strategy.root_device
        else:
            device = torch.device("cpu")
        if (
            self._device_events is None or self._device_events[0] != device
        ):  # events: once per device
            self._device_events = (device, to_device(self.store.events, device))
        return DeviceGatherDataset(self._device_events[1], samples, self.max_len, device)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Counts training batches as they are trained on (the loader and Lightning prefetch, so
        # the sampler's yield count runs ahead): a mid-epoch checkpoint saves this position.
        sampler = getattr(self, "_train_sampler", None)
        if sampler is not None and self.trainer is not None and self.trainer.training:
            sampler.consumed += 1
        return batch

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_split("val"), train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def split_arrays(self, split: str) -> tuple[np.ndarray, ...]:
        s = self.store.splits[split]
        return s.user, s.pos, s.target, s.label


class ResumableDataLoader(DataLoader):
    """The training DataLoader: Lightning saves its position (epoch, batches trained on) in every
    checkpoint and restores it on resume, so a run killed mid-epoch continues with the very
    batches the uninterrupted run would have seen (through its `IndexBatchSampler`)."""

    def state_dict(self) -> dict[str, int]:
        # Lightning may swap the sampler (trainer.overfit_batches): no position then
        return self.sampler.state_dict() if isinstance(self.sampler, IndexBatchSampler) else {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state and isinstance(self.sampler, IndexBatchSampler):
            self.sampler.load_state_dict(state)


def target_behavior_ids(
    names: list[str] | tuple[str, ...] | None, behavior_names: tuple[str, ...]
) -> tuple[int, ...] | None:
    """Behaviour names -> ids 1..K (sorted); None when `names` is None or names every behaviour."""
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    names = list(names)
    unknown = [n for n in names if n not in behavior_names]
    if unknown or not names:
        raise ValueError(
            f"data.target_behaviors={names}; expected a non-empty subset of {list(behavior_names)}"
        )
    ids = tuple(sorted({behavior_names.index(n) + 1 for n in names}))
    return None if len(ids) == len(behavior_names) else ids
