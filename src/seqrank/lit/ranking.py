"""RankingModule: pointwise BCE training, ranking metrics per stage, optimisers — for any `net`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqrank.data.types import Batch, Schema
from seqrank.metrics import RankingMetrics
from seqrank.optim import (
    clip_gradients_,
    has_sparse_grads,
    resolve_sparse_embeddings,
    sparse_embeddings,
)

STAGES = ("train", "val", "test")


class NonFiniteLossError(RuntimeError):
    """Raised when the loss becomes NaN or infinite; the message names the step."""


class SchemaMismatchError(ValueError):
    """Raised when a checkpoint's vocabulary sizes differ from the data's."""


class RankingModule(L.LightningModule):
    """Trains a `net` whose `forward(batch) -> logits (B,)` with binary cross-entropy.

    Args:
        net: the model (BST, ATRank, ...). If it has `regularization() -> Tensor` (ATRank's L2
            on user and target vectors), that term is added to the training loss.
        optimizer: a partial optimiser constructor taking the parameters.
        scheduler: optional partial LR scheduler constructor taking the optimiser.
        scheduler_interval: `epoch` or `step`.
        monitor: the metric the scheduler (ReduceLROnPlateau) watches.
        compile: wrap `net` in `torch.compile`.
        gradient_clip_val: the model's own gradient clipping (global norm), used when
            `trainer.gradient_clip_val` is null; ATRank's reference setting clips at 5.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        *,
        scheduler_interval: str = "epoch",
        monitor: str = "val/auc",
        compile: bool = False,
        gradient_clip_val: float | None = None,
    ) -> None:
        super().__init__()
        if gradient_clip_val is not None and gradient_clip_val <= 0:
            raise ValueError(
                f"model.gradient_clip_val={gradient_clip_val}; expected a float > 0 or null"
            )
        # Plain values only: checkpoints then load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.net = net
        self.metrics = nn.ModuleDict({s: RankingMetrics() for s in ("val", "test")})
        self.run_config: dict[str, Any] | None = None  # the composed Hydra config, for eval.py
        self.on_train_epoch_start()  # the running sum of the training loss (see training_step)

    def setup(self, stage: str) -> None:
        if self.hparams.compile and stage == "fit":
            self.net = torch.compile(self.net)

    def forward(self, batch: Batch) -> Tensor:
        return self.net(batch)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        logits = self.net(batch).float()
        loss = F.binary_cross_entropy_with_logits(logits, batch.label)
        reg = getattr(self.net, "regularization", None)
        if callable(reg):
            loss = loss + reg()
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at global step {self.global_step} "
                f"(epoch {self.current_epoch}, batch {batch_idx}); stopping instead of training on "
                "garbage. Lower the learning rate, enable gradient clipping (trainer.gradient_clip_val) "
                "or use trainer.precision=32."
            )
        # the epoch's mean loss, weighted by batch size as Lightning's on_epoch mean is, kept here:
        # `self.log` costs ~1 ms a call (Lightning moves its metric state every time), 4% of a
        # CPU step of ATRank at batch 256, so it runs only on the steps whose values are written
        if self._train_loss_sum.device != loss.device:  # a step before any epoch start
            self._train_loss_sum = _loss_sum(loss.device).add_(self._train_loss_sum.item())
        self._train_loss_sum.add_(loss.detach(), alpha=len(batch))
        self._train_loss_count += len(batch)
        if self._writes_step_logs():
            self.log(
                "train/loss_step",
                loss,
                on_step=True,
                on_epoch=False,
                prog_bar=True,
                batch_size=len(batch),
            )
        return loss

    def _writes_step_logs(self) -> bool:
        """Whether the trainer writes this training step's logged values (every
        `trainer.log_every_n_steps` steps; Lightning's own monitors ask the same)."""
        trainer = self._trainer
        connector = getattr(trainer, "_logger_connector", None)
        if connector is None:
            return True
        return bool(connector.should_update_logs or trainer.fast_dev_run)

    def on_train_epoch_start(self) -> None:
        self._train_loss_sum = _loss_sum(self.device)
        self._train_loss_count = 0

    def on_train_epoch_end(self) -> None:
        if self._train_loss_count:
            mean = (self._train_loss_sum / self._train_loss_count).float()
            self.log(
                "train/loss_epoch", mean, on_step=False, on_epoch=True, prog_bar=True, batch_size=1
            )

    def _eval_step(self, stage: str, batch: Batch) -> None:
        logits = self.net(batch).float()
        self.metrics[stage].update(logits, batch.label, batch.user, batch.pos, batch.index)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _log_metrics(self, stage: str) -> None:
        values = self.metrics[stage].compute()
        self.metrics[stage].reset()
        n = values.pop("num_samples")
        out = {f"{stage}/{k}": v.float() for k, v in values.items()}
        out[f"{stage}/num_samples"] = n.float()
        # Computed over all ranks already (torchmetrics syncs the states): no extra reduction.
        self.log_dict(out, prog_bar=stage == "val", sync_dist=False, rank_zero_only=False)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.parameters())
        # sparse_embeddings="auto": row gradients where the optimiser's update is the same
        trainer = self._trainer
        precision = trainer.strategy.precision_plugin if trainer is not None else None
        resolve_sparse_embeddings(
            self.net,
            optimizer,
            world_size=trainer.world_size if trainer is not None else 1,
            compiled=bool(self.hparams.compile),
            scaled=getattr(precision, "scaler", None) is not None,
        )
        if sparse_embeddings(self.net) and type(optimizer) is torch.optim.Adam:
            raise ValueError(
                "the net has sparse embeddings (sparse_embeddings=true) but torch.optim.Adam "
                "takes only dense gradients; use optimizer._target_=seqrank.optim.Adam"
            )
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "monitor": self.hparams.monitor,
                "interval": self.hparams.scheduler_interval,
                "frequency": 1,
            },
        }

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping, also for sparse embedding gradients (torch's refuses them).

        `trainer.gradient_clip_val` wins; without it the model's own `gradient_clip_val` (ATRank's
        reference clips the global norm at 5) applies, by norm unless the trainer names another
        algorithm.
        """
        if gradient_clip_val is None:
            gradient_clip_val = self.hparams.get("gradient_clip_val")
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_val is None or not has_sparse_grads(params):
            super().configure_gradient_clipping(
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )
            return
        clip_gradients_(params, float(gradient_clip_val), gradient_clip_algorithm or "norm")

    def _schema(self) -> Schema | None:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return dm.schema if dm is not None and getattr(dm, "store", None) is not None else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint["seqrank_config"] = self.run_config
        schema = self._schema()
        if schema is not None:
            checkpoint["seqrank_schema"] = schema.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuses a checkpoint trained on data with other vocabulary sizes, by name."""
        saved, schema = checkpoint.get("seqrank_schema"), self._schema()
        if saved is None or schema is None:
            return
        keys = ("num_users", "num_items", "num_cates", "num_behaviors")
        diff = {
            k: (saved[k], getattr(schema, k)) for k in keys if saved.get(k) != getattr(schema, k)
        }
        if diff:
            shown = ", ".join(f"{k}: checkpoint {a} vs data {b}" for k, (a, b) in diff.items())
            raise SchemaMismatchError(
                f"checkpoint was trained on dataset {saved.get('name')!r} with another schema "
                f"than {schema.name!r} ({shown}); use the data config it was trained with"
            )


def _loss_sum(device: torch.device) -> Tensor:
    """A zero to sum training losses into: float64, float32 where the device has no float64 (MPS)."""
    dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
    return torch.zeros((), dtype=dtype, device=device)
