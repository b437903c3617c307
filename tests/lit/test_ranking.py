"""RankingModule: loss, regularisation hook, non-finite loss stop, schema checks on load."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from seqrank.data.types import Batch, Schema
from seqrank.lit.ranking import NonFiniteLossError, RankingModule, SchemaMismatchError

SCHEMA = Schema(
    name="t",
    num_users=10,
    num_items=20,
    num_cates=5,
    num_behaviors=2,
    behavior_names=("review",),
    protocol="loo",
)


def batch(B: int = 6, L: int = 4) -> Batch:
    g = torch.Generator().manual_seed(0)
    return Batch(
        user=torch.randint(1, 10, (B,), generator=g),
        hist_item=torch.randint(1, 20, (B, L), generator=g),
        hist_cate=torch.randint(1, 5, (B, L), generator=g),
        hist_behavior=torch.ones(B, L, dtype=torch.long),
        hist_gap=torch.zeros(B, L, dtype=torch.long),
        hist_mask=torch.ones(B, L, dtype=torch.bool),
        target_item=torch.randint(1, 20, (B,), generator=g),
        target_cate=torch.randint(1, 5, (B,), generator=g),
        label=torch.tensor([1.0, 0.0] * (B // 2)),
        index=torch.arange(B),
        pos=torch.arange(B) // 2,
    )


class Const(nn.Module):
    def __init__(self, value: float, reg: float | None = None) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(value))
        self.reg = reg

    def forward(self, b: Batch) -> torch.Tensor:
        return self.w.expand(len(b))

    def regularization(self) -> torch.Tensor:
        return torch.tensor(self.reg if self.reg is not None else 0.0)


def module(net: nn.Module) -> RankingModule:
    return RankingModule(net, optimizer=partial(torch.optim.Adam, lr=1e-3))


def test_bce_loss_and_regularization_added() -> None:
    m = module(Const(0.0, reg=0.25))
    loss = m.training_step(batch(), 0)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item() + 0.25, abs=1e-6)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_loss_stops_naming_the_step(value: float) -> None:
    m = module(Const(value))
    with pytest.raises(NonFiniteLossError, match=r"global step 0 .*batch 3"):
        m.training_step(batch(), 3)


def test_schema_mismatch_on_load_names_sizes() -> None:
    m = module(Const(0.0))

    class DM:
        store = object()
        schema = SCHEMA

    class T:
        datamodule = DM()

    m._trainer = T()  # what Lightning attaches during fit/test
    ok = {"seqrank_schema": SCHEMA.to_dict()}
    m.on_load_checkpoint(ok)
    other = dict(SCHEMA.to_dict(), num_items=99, name="other")
    with pytest.raises(SchemaMismatchError, match=r"num_items: checkpoint 99 vs data 20"):
        m.on_load_checkpoint({"seqrank_schema": other})


def test_hparams_are_plain_for_weights_only_checkpoints() -> None:
    m = module(Const(0.0))
    assert "optimizer" not in m.hparams and "scheduler" not in m.hparams


@pytest.mark.parametrize(("trainer_clip", "expected"), [(None, 0.5), (2.0, 2.0)])
def test_model_gradient_clip_applies_unless_the_trainer_sets_one(trainer_clip, expected) -> None:
    """ATRank's reference clips the global norm at 5 as part of the model setting
    (`model.gradient_clip_val`); `trainer.gradient_clip_val` overrides it."""
    import lightning as L

    module = RankingModule(nn.Linear(4, 3), partial(torch.optim.SGD, lr=1.0), gradient_clip_val=0.5)
    module.trainer = L.Trainer(
        gradient_clip_val=trainer_clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    for p in module.parameters():
        p.grad = torch.full_like(p, 10.0)
    opt = torch.optim.SGD(module.parameters(), lr=1.0)
    module.configure_gradient_clipping(opt, trainer_clip, None)
    norm = torch.sqrt(sum((p.grad**2).sum() for p in module.parameters()))
    assert norm.item() == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="model.gradient_clip_val=0"):
        RankingModule(nn.Linear(4, 3), partial(torch.optim.SGD, lr=1.0), gradient_clip_val=0)


class _Linear(nn.Module):
    """A tiny trainable net: a logit from the target item's embedding, so the loss moves."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 1)

    def forward(self, b: Batch) -> torch.Tensor:
        return self.emb(b.target_item)[:, 0]


class _LogsEveryStep(RankingModule):
    """The way the training loss was logged before: `self.log` on every step, on_step and
    on_epoch, Lightning keeping the epoch mean."""

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            self.net(batch).float(), batch.label
        )
        self.log(
            "train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch)
        )
        return loss

    def on_train_epoch_end(self) -> None:
        pass


def _counted(log, calls: list, key: str, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
    calls.append(key)
    log(key, *args, **kwargs)


def _csv_rows(path) -> list[dict]:  # noqa: ANN001
    import csv

    with open(path) as f:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


@pytest.mark.parametrize("every", [1, 3])
def test_training_loss_logs_as_logging_every_step(tmp_path, every: int) -> None:
    """The training loss is logged only on the steps whose values the trainer writes (every
    `log_every_n_steps`; `self.log` costs ~1 ms a call) and its epoch mean is kept by the module:
    the written metrics equal those of logging on every step, row for row, over two epochs with
    batches of unequal size (the epoch mean weighs them as Lightning does)."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    batches = [batch(B) for B in (6, 4, 6, 2, 6, 6, 4)]  # 7 steps an epoch, the sizes differ
    written = {}
    for name, cls in (("every", _LogsEveryStep), ("ours", RankingModule)):
        torch.manual_seed(0)
        m = cls(_Linear(), optimizer=partial(torch.optim.SGD, lr=0.5))
        calls = []
        m.log = partial(_counted, m.log, calls)
        trainer = L.Trainer(
            max_epochs=2,
            log_every_n_steps=every,
            logger=CSVLogger(tmp_path, name=name),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            accelerator="cpu",
            devices=1,
        )
        trainer.fit(m, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
        written[name] = _csv_rows(tmp_path / name / "version_0" / "metrics.csv")
        if cls is RankingModule:
            # a call per written step (plus each epoch's mean), not one per step
            assert calls.count("train/loss_step") == len(range(every - 1, 14, every))
            assert calls.count("train/loss_epoch") == 2
            assert set(trainer.progress_bar_metrics) == {"train/loss_step", "train/loss_epoch"}
    assert len(written["ours"]) == len(written["every"]) > 0
    for a, b in zip(written["ours"], written["every"], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-6), (key, a, b)
