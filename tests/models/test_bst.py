"""Tests for the Behavior Sequence Transformer (seqrank.models.bst)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqrank.data.types import Batch, Schema
from seqrank.models.bst import BST

POOLINGS = ("concat", "target", "mean")
HIST_FIELDS = ("hist_item", "hist_cate", "hist_behavior", "hist_gap", "hist_mask")
SMALL = {"embed_dim": 8, "num_heads": 2, "max_len": 10, "mlp_dims": (32, 16)}


def _model(schema: Schema, seed: int = 0, **overrides) -> BST:
    torch.manual_seed(seed)
    return BST(schema, **{**SMALL, **overrides})


def _scramble_padding(batch: Batch, seed: int) -> Batch:
    """Random ids, behaviours and gaps wherever hist_mask is False."""
    g = torch.Generator().manual_seed(seed)
    pad = ~batch.hist_mask

    def noise(t: torch.Tensor, high: int) -> torch.Tensor:
        return torch.where(pad, torch.randint(0, high, t.shape, generator=g), t)

    return batch.replace(
        hist_item=noise(batch.hist_item, 100),
        hist_cate=noise(batch.hist_cate, 10),
        hist_behavior=noise(batch.hist_behavior, 2),
        hist_gap=noise(batch.hist_gap, 10**9),
    )


@pytest.mark.parametrize("pooling", POOLINGS)
def test_output_shape(schema, make_batch, pooling: str) -> None:
    model = _model(schema, pooling=pooling)
    for L in (0, 4, 10):
        logits = model(make_batch(schema, B=6, L=L, seed=L))
        assert logits.shape == (6,) and logits.dtype == torch.float32
        assert torch.isfinite(logits).all()


def test_defaults_are_the_paper_sizes(schema) -> None:
    model = BST(schema)
    assert model.d_model == 128  # item 64 + category 64
    assert model.mlp.net[0].in_features == 21 * 128  # (max_len + 1) * d_model
    assert [m.out_features for m in model.mlp.net if isinstance(m, torch.nn.Linear)] == [
        1024,
        512,
        256,
        1,
    ]
    assert model.encoder.layers[0].ffn[0].out_features == 128
    assert model.user_emb is None


@pytest.mark.parametrize("pooling", POOLINGS)
def test_padding_invariance(schema, make_batch, pooling: str) -> None:
    model = _model(schema, pooling=pooling, dropout=0.2, num_layers=2).eval()
    batch = make_batch(schema, B=16, L=10, seed=1)
    logits = model(batch)
    torch.testing.assert_close(model(_scramble_padding(batch, seed=2)), logits, rtol=0, atol=0)
    # more left padding (up to max_len) around the same events gives the same scores
    torch.testing.assert_close(model(_pad_left(batch, 14)), logits, atol=1e-6, rtol=1e-5)
    short = batch.replace(**{k: getattr(batch, k)[:, -7:] for k in HIST_FIELDS})
    torch.testing.assert_close(model(_pad_left(short, 10)), model(short), atol=1e-6, rtol=1e-5)


def _pad_left(batch: Batch, L: int) -> Batch:
    """Left-pad every history field with zeros (mask False) up to length L."""
    n = L - batch.hist_item.shape[1]
    return batch.replace(**{k: F.pad(getattr(batch, k), (n, 0)) for k in HIST_FIELDS})


def test_overfits_a_fixed_batch(schema, make_batch) -> None:
    torch.manual_seed(0)
    model = _model(schema, dropout=0.0, embed_dim=16, mlp_dims=(64, 32))
    batch = make_batch(schema, B=64, L=10, seed=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss = F.binary_cross_entropy_with_logits(model(batch), batch.label)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    assert loss.item() < 0.05


def test_seeded_constructions_agree(taobao_schema, make_batch) -> None:
    batch = make_batch(taobao_schema, B=8, L=10, seed=4)
    a = _model(taobao_schema, seed=7, use_user=True).eval()
    b = _model(taobao_schema, seed=7, use_user=True).eval()
    torch.testing.assert_close(a(batch), b(batch), rtol=0, atol=0)
    assert not torch.equal(_model(taobao_schema, seed=8).eval()(batch), a(batch))


def test_long_history_keeps_the_most_recent_events(schema, make_batch) -> None:
    model = _model(schema, max_len=5).eval()
    batch = make_batch(schema, B=8, L=12, seed=5)
    recent = batch.replace(**{k: getattr(batch, k)[:, -5:] for k in HIST_FIELDS})
    torch.testing.assert_close(model(batch), model(recent), rtol=0, atol=0)
    # changing only the old events changes nothing; changing a recent one does
    old = batch.hist_item.clone()
    old[:, :7] = torch.randint(1, 100, (8, 7))
    torch.testing.assert_close(model(batch.replace(hist_item=old)), model(batch), rtol=0, atol=0)
    new = batch.hist_item.clone()
    new[1, -1] = (new[1, -1] % 98) + 1
    assert not torch.equal(model(batch.replace(hist_item=new))[1], model(batch)[1])


def test_gradient_reaches_the_time_embedding(schema, make_batch) -> None:
    model = _model(schema)
    batch = make_batch(schema, B=8, L=10, seed=6)
    F.binary_cross_entropy_with_logits(model(batch), batch.label).backward()
    grad = model.time_emb.embedding.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # and the position matters: other gaps, other scores
    model.eval()
    assert not torch.equal(model(batch.replace(hist_gap=batch.hist_gap * 4)), model(batch))


def test_behavior_embedding_only_with_several_behaviors(schema, taobao_schema, make_batch) -> None:
    assert _model(schema).behavior_emb is None
    assert _model(taobao_schema, use_behavior=False).behavior_emb is None
    model = _model(taobao_schema).eval()
    assert (
        model.behavior_emb is not None and model.behavior_emb.num_embeddings == 6
    )  # 5 + candidate
    batch = make_batch(taobao_schema, B=8, L=10, seed=7)
    flipped = torch.where(batch.hist_mask, batch.hist_behavior % 4 + 1, 0)
    assert not torch.equal(model(batch.replace(hist_behavior=flipped)), model(batch))
    model(batch).sum().backward()
    assert model.behavior_emb.weight.grad[5].abs().sum() > 0  # the candidate row is used


def test_user_embedding_and_attention_weights(schema, make_batch) -> None:
    model = _model(schema, use_user=True, num_layers=2).eval()
    batch = make_batch(schema, B=4, L=6, seed=8)
    assert model(batch).shape == (4,)
    weights = model.attention_weights(batch)
    assert len(weights) == 2 and weights[0].shape == (4, 2, 7, 7)
    assert (weights[0][0, :, :, :-1] == 0).all()  # row 0 has an empty history: only the target


@pytest.mark.parametrize("init_std", [0.02, 0.1])
def test_embeddings_init(schema, init_std: float) -> None:
    model = _model(schema, init_std=init_std)
    for emb in (model.item_emb, model.cate_emb):
        assert (emb.weight[0] == 0).all()
        assert 0.5 * init_std < emb.weight[1:].std().item() < 1.5 * init_std


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"embed_dim": 64, "num_heads": 3},
            r"num_heads=3 must divide the attention width d_model=128",
        ),
        ({"pooling": "max"}, r"pooling='max' must be one of \('concat', 'target', 'mean'\)"),
        ({"max_len": 0}, "max_len"),
        ({"time_buckets": 0}, "time_buckets"),
        ({"embed_dim": 0}, "embed_dim"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
    ],
)
def test_invalid_hyperparameters(schema, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BST(schema, **kwargs)


def test_finite_float_logits_under_bf16_autocast(taobao_schema, make_batch) -> None:
    model = _model(taobao_schema, use_user=True)
    batch = make_batch(taobao_schema, B=8, L=12, seed=9)  # row 0 has an empty history
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(batch)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_sparse_embeddings_same_logits_row_gradients(schema, make_batch) -> None:
    dense = _model(schema, use_user=True, dropout=0.0)
    sparse = _model(schema, use_user=True, dropout=0.0, sparse_embeddings=True)
    batch = make_batch(schema, B=6, L=8, seed=10)
    logits = sparse(batch)
    torch.testing.assert_close(logits, dense(batch))
    logits.sum().backward()
    dense(batch).sum().backward()
    for name in ("item_emb", "cate_emb", "user_emb"):
        g, ref = getattr(sparse, name).weight.grad, getattr(dense, name).weight.grad
        assert g.is_sparse
        torch.testing.assert_close(g.to_dense(), ref)
        # rows outside the batch (and the padding row) are not in the gradient at all
        assert 0 not in g.coalesce().indices()
    assert not sparse.time_emb.embedding.weight.grad.is_sparse


@pytest.mark.slow
@pytest.mark.parametrize("sparse", [False, True])
def test_compiles_and_matches_eager(schema, make_batch, sparse: bool) -> None:
    """RankingModule(compile=True) path: inductor on CPU, forward and backward as eager."""
    eager = _model(schema, dropout=0.0, sparse_embeddings=sparse)
    model = _model(schema, dropout=0.0, sparse_embeddings=sparse)
    compiled = torch.compile(model)
    batch = make_batch(schema, B=8, L=10, seed=11)
    out = compiled(batch)
    torch.testing.assert_close(out, eager(batch), rtol=1e-4, atol=1e-5)
    out.sum().backward()
    eager(batch).sum().backward()
    for a, b in zip(model.parameters(), eager.parameters(), strict=True):
        ga, gb = (p.grad.to_dense() if p.grad.is_sparse else p.grad for p in (a, b))
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)
