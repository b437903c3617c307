"""seqrank.optim.Adam: dense path is torch's Adam; sparse gradients give dense Adam's updates
(C++ kernel or densified) or, lazily, the same formula on their rows; clipping of sparse
gradients; checkpoints round-trip the optimiser state; Lightning wiring."""

from __future__ import annotations

import re
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from seqrank import kernels
from seqrank.data.types import Batch, Schema
from seqrank.lit.ranking import RankingModule
from seqrank.models.atrank import ATRank
from seqrank.models.bst import BST
from seqrank.optim import Adam, clip_gradients_, resolve_sparse_embeddings
from tests.kernels import require_kernel
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
    sparse: bool, steps: int, *, fused: bool = False, lr: float = 1e-3, lazy: bool = True
) -> tuple[list[float], BST]:
    torch.manual_seed(0)
    net = BST(SCHEMA, max_len=6, dropout=0.0, mlp_dims=(32,), sparse_embeddings=sparse)
    opt = Adam(net.parameters(), lr=lr, fused=fused, lazy=lazy)
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


def test_lazy_differs_later_only_on_rows_missing_from_a_batch() -> None:
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


def adam_kernel_off(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """`path` "kernel": the C++ kernel (skips without a compiler); "densified": without it."""
    if path == "kernel":
        require_kernel("adam")
    else:
        monkeypatch.setenv("SEQRANK_FUSED_ADAM", "0")


@pytest.mark.parametrize("path", ["kernel", "densified"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"weight_decay": 0.1},
        {"weight_decay": 0.1, "decoupled_weight_decay": True},
        {"maximize": True, "betas": (0.6, 0.9)},  # 1 - beta1 >= 0.5: lerp from the other end
    ],
)
def test_sparse_gradients_give_dense_adams_updates(
    monkeypatch: pytest.MonkeyPatch, path: str, options: dict
) -> None:
    """The default for a sparse gradient: every row moves as torch's Adam moves it with the dense
    gradient - rows looked up twice, rows of earlier batches only (their moments decay and they
    keep moving), rows never looked up, weight decay on all of them - in float64 to rounding."""
    adam_kernel_off(monkeypatch, path)
    torch.manual_seed(0)
    sparse = nn.Embedding(9, 3, sparse=True, dtype=torch.float64)
    dense = nn.Embedding(9, 3, dtype=torch.float64)
    dense.load_state_dict(sparse.state_dict())
    ours = Adam(sparse.parameters(), lr=0.05, **options)
    theirs = torch.optim.Adam(dense.parameters(), lr=0.05, **options)
    for rows in ([2, 2, 4, 7], [1, 2], [4, 4, 4], [8]):  # 0, 3, 5, 6 never looked up
        x = torch.tensor(rows)
        for emb, opt in ((sparse, ours), (dense, theirs)):
            opt.zero_grad(set_to_none=True)
            (emb(x) * torch.arange(1.0, 4.0, dtype=torch.float64)).sum().backward()
            opt.step()
        assert sparse.weight.grad.is_sparse
        torch.testing.assert_close(sparse.weight, dense.weight, rtol=1e-12, atol=1e-14)
    for name in ("exp_avg", "exp_avg_sq", "step"):
        torch.testing.assert_close(
            ours.state[sparse.weight][name], theirs.state[dense.weight][name]
        )


def test_sparse_float32_matches_dense_adam_in_a_model() -> None:
    """BST with sparse embeddings, default (dense-equivalent) Adam, fused torch Adam for the
    dense parameters: the same weights as with dense embeddings after several steps, to float32
    rounding (a row looked up twice sums its gradients in another order, and where v is tiny
    Adam's m / sqrt(v) magnifies that: one weight of 19,200 differs by 3e-6 = 0.3% of lr)."""
    _, dense = train(False, 4, fused=True)
    _, sparse = train(True, 4, fused=True, lazy=False)
    assert sparse.item_emb.weight.grad.is_sparse
    for (name, a), b in zip(dense.named_parameters(), sparse.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_sparse_adam_kernel_is_the_default_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the kernel built, a sparse gradient goes to it (lazy=False); lazy=True does not."""
    kernel = require_kernel("adam")
    calls = []

    class Spy:
        def sparse_dense_adam(self, *args) -> None:  # noqa: ANN002
            calls.append(args[3].tolist())  # the rows
            kernel.sparse_dense_adam(*args)

    monkeypatch.setitem(kernels._state, "adam", Spy())
    for lazy in (False, True):
        emb = nn.Embedding(5, 2, sparse=True)
        opt = Adam(emb.parameters(), lazy=lazy)
        emb(torch.tensor([3, 1, 3])).sum().backward()
        opt.step()
    assert calls == [[3, 1, 3]]  # as the backward gives them: the kernel sums the repeat


def test_lazy_survives_a_state_dict_without_it() -> None:
    """A checkpoint's param groups replace ours on load; one saved before `lazy` existed takes
    the optimiser's own setting, one saved with it keeps the saved value."""
    emb = nn.Embedding(5, 2, sparse=True)
    for lazy in (False, True):
        opt = Adam(emb.parameters(), lazy=lazy)
        old = opt.state_dict()
        del old["param_groups"][0]["lazy"]
        opt.load_state_dict(old)
        assert opt.param_groups[0]["lazy"] is lazy
        opt.load_state_dict(Adam(emb.parameters(), lazy=not lazy).state_dict())
        assert opt.param_groups[0]["lazy"] is (not lazy)
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    assert opt.param_groups[-1]["lazy"] is True


def test_sparse_adam_kernel_rejects_bad_tensors_naming_them() -> None:
    kernel = require_kernel("adam")
    p, m, v = torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4, 2)
    rows, values = torch.tensor([1]), torch.ones(1, 2)
    args = (1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, 1.0)
    with pytest.raises(RuntimeError, match="values .* do not hold one row"):
        kernel.sparse_dense_adam(p, m, v, rows, torch.ones(2, 2), *args)
    with pytest.raises(RuntimeError, match="share a dtype"):
        kernel.sparse_dense_adam(p, m.double(), v, rows, values, *args)
    with pytest.raises(RuntimeError, match="moments .* do not match"):
        kernel.sparse_dense_adam(p, torch.zeros(3, 2), v, rows, values, *args)
    with pytest.raises(RuntimeError, match="rows must be a 1-d int64"):
        kernel.sparse_dense_adam(p, m, v, rows.int(), values, *args)
    for bad in ([1, 4], [-1], [2, 1, 9]):
        before = p.clone()
        with pytest.raises(RuntimeError, match=r"rows must be in \[0, 4\); row \d is (4|-1|9)"):
            kernel.sparse_dense_adam(p, m, v, torch.tensor(bad), torch.ones(len(bad), 2), *args)
        assert torch.equal(p, before) and not m.any() and not v.any()  # nothing half-written


def test_sparse_adam_kernel_sums_repeated_rows_in_any_order() -> None:
    """Rows unsorted and repeated (an uncoalesced gradient) give the coalesced gradient's
    update: float64, against the same kernel on the coalesced rows."""
    kernel = require_kernel("adam")
    torch.manual_seed(0)
    rows = torch.tensor([7, 2, 7, 0, 2, 7, 5])
    values = torch.randn(len(rows), 3, dtype=torch.float64)
    coalesced = torch.sparse_coo_tensor(rows[None], values, (9, 3)).coalesce()
    args = (0.05, 0.9, 0.999, 1e-8, 0.01, False, False, 3.0)
    out = []
    for r, vals in ((rows, values), (coalesced.indices()[0], coalesced.values())):
        p = torch.arange(27.0, dtype=torch.float64).view(9, 3) / 10
        m = torch.full_like(p, 0.01)
        v = torch.full_like(p, 0.02)
        kernel.sparse_dense_adam(p, m, v, r.contiguous(), vals.contiguous(), *args)
        out.append((p, m, v))
    for a, b in zip(*out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)


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
    opt = Adam(emb.parameters(), lr=0.1, eps=1e-8, lazy=True)
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


def lit_module(sparse: bool | str) -> RankingModule:
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


def grads_seen(module: RankingModule) -> list[bool]:
    """Records, per training step, whether the item table's gradient was sparse."""
    seen: list[bool] = []
    module.on_before_optimizer_step = lambda opt: seen.append(  # type: ignore[method-assign]
        module.net.item_emb.weight.grad.is_sparse
    )
    return seen


def test_auto_gives_row_gradients_on_one_cpu_process(tmp_path) -> None:  # noqa: ANN001
    """sparse_embeddings="auto" (the configs' default): with seqrank's Adam on one CPU process
    the tables train with row gradients, and the weights are those of dense gradients."""
    require_kernel("adam")
    auto = lit_module(sparse="auto")
    assert not auto.net.item_emb.sparse  # undecided until the run's optimiser exists
    seen = grads_seen(auto)
    fit(auto, tmp_path, enable_checkpointing=False)
    assert seen == [True] * 3 and auto.net.item_emb.sparse and auto.net.cate_emb.sparse
    dense = lit_module(sparse=False)
    seen = grads_seen(dense)
    fit(dense, tmp_path, enable_checkpointing=False)
    assert seen == [False] * 3
    for (name, a), b in zip(dense.named_parameters(), auto.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("optimizer", "match"),
    [
        (partial(torch.optim.Adam, lr=1e-3), "not seqrank.optim.Adam"),
        (partial(Adam, lr=1e-3, lazy=True), "lazy Adam"),
    ],
)
def test_auto_stays_dense_where_rows_would_change_the_updates(
    tmp_path,
    optimizer,
    match: str,
    caplog: pytest.LogCaptureFixture,  # noqa: ANN001
) -> None:
    """torch's Adam (which refuses sparse gradients) and lazy Adam (another optimiser) keep
    dense gradients under "auto", saying why; an explicit `true` with torch's Adam still fails."""
    torch.manual_seed(0)
    net = BST(SCHEMA, max_len=6, dropout=0.0, mlp_dims=(32,), sparse_embeddings="auto")
    module = RankingModule(net, optimizer=optimizer)
    seen = grads_seen(module)
    with caplog.at_level("INFO", logger="seqrank.optim"):
        fit(module, tmp_path, steps=2, enable_checkpointing=False)
    assert seen == [False, False]
    assert re.search(f"sparse_embeddings=auto: dense gradients, since .*{match}", caplog.text)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"world_size": 2}, "2 processes train together"),
        ({"compiled": True}, "compiled"),
        ({"scaled": True}, "gradient scaler"),
    ],
)
def test_auto_resolution_reasons(kwargs: dict, match: str) -> None:
    require_kernel("adam")
    net = ATRank(SCHEMA, max_len=6)  # "auto" by default, like BST
    opt = Adam(net.parameters())
    assert resolve_sparse_embeddings(net, opt) is None
    assert net.behaviors.item.sparse and net.behaviors.cate.sparse
    assert match in resolve_sparse_embeddings(net, opt, **kwargs)
    assert not net.behaviors.item.sparse and not net.behaviors.cate.sparse
    meta = ATRank(SCHEMA, max_len=6).to("meta")
    assert "not on the CPU" in resolve_sparse_embeddings(meta, Adam(meta.parameters()))
    # tables set explicitly are not touched
    fixed = ATRank(SCHEMA, max_len=6, sparse_embeddings=False)
    assert resolve_sparse_embeddings(fixed, Adam(fixed.parameters())) is None
    assert not fixed.behaviors.item.sparse


@pytest.mark.parametrize("model", [BST, ATRank])
@pytest.mark.parametrize("value", ["yes", 1, None])
def test_sparse_embeddings_rejects_other_values(model: type, value: object) -> None:
    with pytest.raises(ValueError, match=r"sparse_embeddings=.* is invalid; allowed: true, false"):
        model(SCHEMA, max_len=6, sparse_embeddings=value)
