"""seqrank.optim.Adam: dense path is torch's Adam; sparse rows follow the same formula (lazy);
clipping of sparse gradients; checkpoints round-trip the optimiser state; Lightning wiring."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from seqrank.data.types import Batch, Schema
from seqrank.lit.ranking import RankingModule
from seqrank.models.bst import BST
from seqrank.optim import Adam, clip_gradients_
from tests.models.conftest import make_batch

SCHEMA = Schema(
    name="t",
    num_users=50,
    num_items=300,
    num_cates=20,
    num_behaviors=2,
    behavior_names=("review",),
    protocol="loo",
)


def batches(n: int = 4, B: int = 16, L: int = 6) -> list[Batch]:
    return [make_batch(SCHEMA, B, L, seed=s) for s in range(n)]


def train(
    sparse: bool, steps: int, *, fused: bool = False, lr: float = 1e-3
) -> tuple[list[float], BST]:
    torch.manual_seed(0)
    net = BST(SCHEMA, max_len=6, dropout=0.0, mlp_dims=(32,), sparse_embeddings=sparse)
    opt = Adam(net.parameters(), lr=lr, fused=fused)
    losses = []
    for b in batches()[:steps]:
        loss = F.binary_cross_entropy_with_logits(net(b), b.label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, net


@pytest.mark.parametrize("fused", [False, True])
def test_sparse_first_step_equals_dense(fused: bool) -> None:
    (d1, d2), dense = train(False, 2, fused=fused)
    (s1, s2), sparse = train(True, 2, fused=fused)
    assert sparse.item_emb.weight.grad.is_sparse and not dense.item_emb.weight.grad.is_sparse
    # the loss after one update depends on the first step only: lazy == dense there
    assert s1 == pytest.approx(d1, abs=1e-7)
    assert s2 == pytest.approx(d2, rel=1e-5)


def test_sparse_differs_later_only_on_rows_missing_from_a_batch() -> None:
    """Lazy Adam: rows outside the batch keep their moments and values (dense Adam moves them)."""
    _, dense = train(False, 2)
    _, sparse = train(True, 2)
    b = batches()[1]
    rows = torch.cat([b.hist_item.flatten(), b.target_item]).unique()
    first = torch.cat([batches()[0].hist_item.flatten(), batches()[0].target_item]).unique()
    stale = first[~torch.isin(first, rows)]  # updated at step 1, absent at step 2
    assert len(stale) > 0
    d, s = dense.item_emb.weight.detach(), sparse.item_emb.weight.detach()
    torch.testing.assert_close(s[rows], d[rows], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(s[stale], d[stale])


def test_dense_path_is_torch_adam() -> None:
    def run(opt_cls: type) -> list[torch.Tensor]:
        torch.manual_seed(0)
        net = nn.Linear(4, 2)
        opt = opt_cls(net.parameters(), lr=0.1, weight_decay=0.01)
        for _ in range(3):
            opt.zero_grad()
            net(torch.ones(3, 4)).square().sum().backward()
            opt.step()
        return [p.detach().clone() for p in net.parameters()]

    for a, b in zip(run(Adam), run(torch.optim.Adam), strict=True):
        torch.testing.assert_close(a, b)


def test_rowwise_adam_matches_formula() -> None:
    """A row hit twice in one batch gets its summed gradient, then Adam's update."""
    emb = nn.Embedding(5, 3, sparse=True)
    w0 = emb.weight.detach().clone()
    opt = Adam(emb.parameters(), lr=0.1, eps=1e-8)
    emb(torch.tensor([2, 2, 4])).sum().backward()
    opt.step()
    g = torch.zeros(5, 3)
    g[2], g[4] = 2.0, 1.0
    m, v = 0.1 * g, 0.001 * g * g
    expected = w0 - 0.1 * (m / 0.1) / ((v / 0.001).sqrt() + 1e-8)
    torch.testing.assert_close(emb.weight.detach(), expected)
    torch.testing.assert_close(opt.state[emb.weight]["exp_avg"], m)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_clipping_sparse_and_dense_together(algorithm: str) -> None:
    emb, lin = nn.Embedding(6, 2, sparse=True), nn.Linear(2, 1)
    lin(emb(torch.tensor([1, 1, 3]))).sum().mul(10).backward()
    dense_grads = [emb.weight.grad.to_dense()] + [p.grad.clone() for p in lin.parameters()]
    params = [emb.weight, *lin.parameters()]
    total = clip_gradients_(params, 1.0, algorithm)
    after = [emb.weight.grad.to_dense()] + [p.grad for p in lin.parameters()]
    if algorithm == "norm":
        expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in dense_grads]))
        torch.testing.assert_close(total, expected)  # duplicates summed before the norm
        new = torch.linalg.vector_norm(torch.cat([g.flatten() for g in after]))
        assert new == pytest.approx(1.0, rel=1e-4)
    else:
        for g0, g1 in zip(dense_grads, after, strict=True):
            torch.testing.assert_close(g1, g0.clamp(-1.0, 1.0))


def lit_module(sparse: bool) -> RankingModule:
    torch.manual_seed(0)
    net = BST(SCHEMA, max_len=6, dropout=0.0, mlp_dims=(32,), sparse_embeddings=sparse)
    return RankingModule(net, optimizer=partial(Adam, lr=1e-3, fused=True))


def fit(
    module: RankingModule, tmp_path, steps: int = 3, ckpt_path=None, **trainer_kwargs
) -> L.Trainer:  # noqa: ANN001
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    # one batch repeated: a resumed run sees the same data whichever batch it restarts at
    loader = DataLoader([batches()[0]] * 8, batch_size=None)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_lightning_clips_sparse_gradients(tmp_path, algorithm: str) -> None:  # noqa: ANN001
    m = lit_module(sparse=True)
    before = m.net.item_emb.weight.detach().clone()
    fit(m, tmp_path, gradient_clip_val=0.01, gradient_clip_algorithm=algorithm)
    assert not torch.equal(before, m.net.item_emb.weight)


def test_checkpoint_round_trips_optimizer_state(tmp_path) -> None:  # noqa: ANN001
    m = lit_module(sparse=True)
    trainer = fit(m, tmp_path, enable_checkpointing=False)
    path = tmp_path / "a.ckpt"
    trainer.save_checkpoint(path)
    state = trainer.optimizers[0].state_dict()
    saved = torch.load(path, weights_only=True)["optimizer_states"][0]
    assert saved["state"].keys() == state["state"].keys()
    for k, s in state["state"].items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(saved["state"][k][name], s[name])
    # resumed from step 3, the optimiser continues exactly like an uninterrupted run
    resumed = lit_module(sparse=True)
    fit(resumed, tmp_path, steps=5, ckpt_path=path, enable_checkpointing=False)
    straight = lit_module(sparse=True)
    fit(straight, tmp_path, steps=5, enable_checkpointing=False)
    for a, b in zip(resumed.parameters(), straight.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_torch_adam_with_sparse_embeddings_fails_naming_the_fix() -> None:
    net = BST(SCHEMA, max_len=6, sparse_embeddings=True)
    m = RankingModule(net, optimizer=partial(torch.optim.Adam, lr=1e-3))
    with pytest.raises(ValueError, match="seqrank.optim.Adam"):
        m.configure_optimizers()
