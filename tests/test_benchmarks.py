"""benchmarks/bench_train.py: its references compute our models' function, its ceiling counts
every matrix product of every recorded step, its random stores have the history lengths they
claim, and one benchmark row runs end to end (on a tiny random store)."""

from __future__ import annotations

import inspect
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import seqrank.models.layers.attention as attention_module
from seqrank import kernels
from seqrank.data.datamodule import SeqDataModule
from seqrank.models.atrank import ATRank
from seqrank.models.bst import BST
from seqrank.models.layers.attention import ragged_self_attention, self_attention
from seqrank.models.layers.ragged import right_aligned_linear
from tests.kernels import require_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_train  # noqa: E402

HIST = 6


@pytest.fixture(scope="module")
def dm(tmp_path_factory: pytest.TempPathFactory) -> SeqDataModule:
    source = bench_train.RandomElectronics(users=300, items=200, cates=15, events=6000)
    dm = SeqDataModule(
        source,
        name="random_electronics",
        max_len=HIST,
        batch_size=32,
        processed_dir=tmp_path_factory.mktemp("bench") / "processed",
    )
    dm.prepare_data()
    dm.setup()
    return dm


def _batch(dm: SeqDataModule):  # noqa: ANN202
    batch = next(iter(dm.train_dataloader()))
    assert batch.hist_item.shape == (32, HIST) and batch.hist_mask.any(1).all()
    return batch


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def test_plain_bst_is_the_same_function_as_bst(dm: SeqDataModule) -> None:
    torch.manual_seed(0)
    ours = BST(dm.schema, embed_dim=8, num_heads=8, max_len=HIST).eval()
    plain = bench_train.PlainBST(dm.schema.num_items, dm.schema.num_cates, HIST, d=8).eval()
    block = ours.encoder.layers[0]
    with torch.no_grad():
        plain.item.weight.copy_(ours.item_emb.weight)
        plain.cate.weight.copy_(ours.cate_emb.weight)
        plain.time.weight.copy_(ours.time_emb.embedding.weight)
        plain.enc.self_attn.in_proj_weight.copy_(block.attn.qkv.weight)
        plain.enc.self_attn.in_proj_bias.copy_(block.attn.qkv.bias)
        pairs = [
            (block.attn.out, plain.enc.self_attn.out_proj),
            (block.ffn[0], plain.enc.linear1),
            (block.ffn[2], plain.enc.linear2),
            (block.norm1, plain.enc.norm1),
            (block.norm2, plain.enc.norm2),
            *zip(_linears(ours.mlp), _linears(plain.mlp), strict=True),
        ]
        for a, b in pairs:
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)
    b = _batch(dm)
    pad = ~torch.cat([b.hist_mask, torch.ones(32, 1, dtype=torch.bool)], 1)
    bucket = bench_train.log2_time_bucket(F.pad(b.hist_gap, (0, 1)), 12)
    got = plain(b.hist_item, b.hist_cate, b.target_item, b.target_cate, bucket, pad)
    torch.testing.assert_close(got, ours(b), atol=1e-5, rtol=1e-4)


def test_plain_atrank_is_the_same_function_as_atrank(dm: SeqDataModule) -> None:
    torch.manual_seed(0)
    ours = ATRank(dm.schema, embed_dim=8, num_heads=8, max_len=HIST).eval()
    plain = bench_train.PlainATRank(dm.schema.num_items, dm.schema.num_cates, d=8).eval()
    emb = ours.behaviors
    with torch.no_grad():
        plain.item.weight.copy_(emb.item.weight)
        plain.cate.weight.copy_(emb.cate.weight)
        plain.item_b.weight.copy_(ours.item_bias[:, None])
        # a dense over [object; one_hot(bucket)] = the projection plus a per-bucket row
        plain.hist.weight.copy_(torch.cat([emb.proj[0].weight, emb.time[0].weight.T], dim=1))
        plain.hist.bias.copy_(emb.proj[0].bias)
        for blk, theirs in zip((*ours.self_blocks, *ours.target_blocks), plain.blocks, strict=True):
            pairs = [
                (blk.attn.q, theirs["q"]),
                (blk.attn.k, theirs["k"]),
                (blk.attn.v, theirs["v"]),
                (blk.attn.ln, theirs["ln"]),
                (blk.ffn.inner, theirs["f1"]),
                (blk.ffn.outer, theirs["f2"]),
                (blk.ffn.ln, theirs["ln2"]),
            ]
            for a, b in pairs:
                b.weight.copy_(a.weight)
                b.bias.copy_(a.bias)
    b = _batch(dm)
    bucket = bench_train.log2_time_bucket(b.hist_gap, 12)
    got = plain(b.hist_item, b.hist_cate, bucket, b.hist_mask, b.target_item, b.target_cate)
    torch.testing.assert_close(got, ours(b), atol=1e-5, rtol=1e-4)


def test_ceiling_records_every_matrix_product_of_a_step() -> None:
    lin = nn.Linear(32, 16)
    x = torch.randn(64, 32)
    flops, calls = bench_train.record_step(lambda: lin(x).sum().backward())
    assert flops == 2 * (2 * 64 * 32 * 16)  # forward and weight gradient (x needs none)
    ops = sorted(str(func) for (func, _, _), _ in calls.items())
    assert ops == ["aten.addmm.default", "aten.mm.default"]
    assert sum(calls.values()) == 2
    ceiling = bench_train.Ceiling(calls)
    assert ceiling.seconds() == float("inf")  # nothing sampled yet
    ceiling.sample()
    first = ceiling.seconds()
    ceiling.sample()
    assert 0 < ceiling.seconds() <= first < 0.1  # the fastest pass


def test_ceiling_records_in_place_and_out_products() -> None:
    """BST's ragged first MLP layer runs `addmm(out=)` forward and `addmm_` for its weight
    gradient: both are recorded and replayed, with the FLOPs of the same product out of place."""
    w = torch.randn(16, 40, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    xs = [torch.randn(5, 40), torch.randn(7, 24)]
    flops, calls = bench_train.record_step(lambda: right_aligned_linear(xs, w, b).sum().backward())
    assert flops == 2 * (2 * 16 * (5 * 40 + 7 * 24))  # forward and weight gradient, no zeros
    ops = sorted(str(func) for (func, _, _), _ in calls.items())
    assert ops == ["aten.addmm.out"] * 2 + ["aten.addmm_.default"] * 2
    outs = [dict(kw)["out"] for (func, _, kw) in calls if "out" in dict(kw)]
    assert sorted(o[0] for o in outs) == [(5, 16), (7, 16)]  # replayed into their own layouts
    ceiling = bench_train.Ceiling(calls)
    assert len(ceiling.runs) == 4
    ceiling.sample()
    assert 0 < ceiling.seconds() < 0.1


def test_ceiling_counts_the_fused_attention_kernels_products(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The C++ attention kernel's products (invisible to dispatch modes) are counted as the
    bmm's they are: the same FLOPs as the Python kernels' bmm's, and replayed as bmm's."""
    require_kernel("attention")
    torch.manual_seed(0)
    x = torch.randn(6, 9, 3, 4, 8, requires_grad=True)  # (B, L, q/k/v, H, d)
    mask = torch.rand(6, 9) > 0.3
    mask[:, -1] = True
    counted = {}
    for fused in (True, False):
        monkeypatch.setattr(attention_module, "FUSED", fused)
        counted[fused] = bench_train.record_step(
            lambda: self_attention(x, mask, mask).sum().backward()
        )
    (flops, calls), (python_flops, python_calls) = counted[True], counted[False]
    assert flops == python_flops == 6 * (2 * 24 * 9 * 9 * 8)  # 2 products forward, 4 backward
    assert sum(calls.values()) == sum(python_calls.values()) == 6
    assert {str(func) for func, _, _ in calls} == {"aten.bmm.default"}
    assert kernels._state["attention"] is not None  # the real kernel is back
    assert not isinstance(kernels._state["attention"], bench_train.RecordFusedAttention)
    ceiling = bench_train.Ceiling(calls)
    ceiling.sample()
    assert 0 < ceiling.seconds() < 0.1


def test_ceiling_counts_the_ragged_kernels_products_exactly_as_one_batch() -> None:
    """The ragged kernel's products: their exact FLOPs (each sample's own (Lq_b, Lk_b) heads,
    nothing for a sample without keys), replayed as one bmm per product over the samples with
    keys at a FLOP-equivalent shape (not hundreds of tiny bmm's, whose call overhead would
    lower the ceiling)."""
    require_kernel("attention")
    torch.manual_seed(0)
    lengths = [3, 5, 3, 0, 1]
    offsets = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int64)
    x = torch.randn(sum(lengths), 3, 4, 8, requires_grad=True)  # (R, q/k/v, H, d)
    flops, calls = bench_train.record_step(
        lambda: ragged_self_attention(x, offsets).sum().backward()
    )
    assert flops == 6 * sum(2 * 4 * n * n * 8 for n in lengths)  # 2 products forward, 4 backward
    assert sum(calls.values()) == 6  # one bmm per product
    # 4 samples with keys x 4 heads; Lq = round(12 / 4) = 3, Lk = round((9 + 25 + 9 + 1) / 12) = 4
    shapes = {spec[0][0] for _, spec, _ in calls} | {spec[1][0] for _, spec, _ in calls}
    assert shapes == {(16, 3, 8), (16, 8, 4), (16, 3, 4), (16, 4, 3), (16, 4, 8)}
    ceiling = bench_train.Ceiling(calls)
    ceiling.sample()
    assert 0 < ceiling.seconds() < 0.1


def test_ceiling_of_several_steps_counts_all_of_them() -> None:
    """Steps on batches of different sizes (as length groups make them): FLOPs and calls add up,
    and the ceiling's time is per step."""
    lin = nn.Linear(32, 16)
    xs = iter([torch.randn(64, 32), torch.randn(8, 32), torch.randn(64, 32)])
    flops, calls = bench_train.record_steps(lambda: lin(next(xs)).sum().backward(), 3)
    assert flops == 2 * (2 * 64 * 32 * 16) * 2 + 2 * (2 * 8 * 32 * 16)
    # the 64-row products twice, the 8-row ones once
    assert sum(calls.values()) == 6 and sorted(calls.values()) == [1, 1, 2, 2]
    one_flops, one_calls = bench_train.record_step(lambda: lin(torch.randn(8, 32)).sum().backward())
    assert one_flops == 2 * (2 * 8 * 32 * 16) and set(one_calls) < set(calls)
    ceiling = bench_train.Ceiling(calls, steps=3)
    assert sorted(count for count, _ in ceiling.runs) == [1, 1, 2, 2]  # a pass replays all 3 steps
    ceiling.sample()
    assert ceiling.seconds() == pytest.approx(ceiling.best / 3)


def test_interleaved_runs_the_paths_in_turns_with_a_pass_after_each() -> None:
    order = []

    class Passes:
        def sample(self) -> None:
            order.append("pass")

    def path(name: str):  # noqa: ANN202
        return lambda: order.append(name)

    bests = bench_train.interleaved([path("ours"), path("ref")], Passes(), steps=2, warmup=1)
    assert order == ["ours", "ref"] + ["ours", "pass", "ref", "pass"] * 2
    assert len(bests) == 2 and all(0 <= t < 0.1 for t in bests)


def test_electronics_lengths_are_a_5_core_with_the_real_mean() -> None:
    counts = np.bincount(bench_train.RandomElectronics().event_users(np.random.default_rng(1)))
    assert len(counts) == 192_403 and counts.sum() == 1_689_188
    assert counts.min() >= 5 and counts.max() <= 400
    assert counts.mean() == pytest.approx(8.78, abs=0.01)
    # a heavy tail, not a constant
    assert 0.2 < (counts == 5).mean() < 0.6 and (counts >= 50).sum() > 100
    old = np.bincount(
        bench_train.RandomElectronics(lengths="poisson").event_users(np.random.default_rng(1))
    )
    assert (old < 5).any()  # what the old data had


def test_the_store_keeps_every_electronics_user(dm: SeqDataModule) -> None:
    assert np.diff(dm.store.events.user_offsets)[1:].min() >= 5
    assert dm.store.schema.num_users - 1 == 300


def test_full_lengths_give_every_training_sample_a_full_history(tmp_path: Path) -> None:
    source = bench_train.RandomElectronics(
        users=300, items=200, cates=15, events=6000, lengths="full", hist=HIST
    )
    assert (
        source.fingerprint()
        != bench_train.RandomElectronics(users=300, items=200, cates=15, events=6000).fingerprint()
    )
    dm = SeqDataModule(
        source,
        name="random_electronics",
        max_len=HIST,
        batch_size=64,
        processed_dir=tmp_path / "processed",
    )
    dm.prepare_data()
    dm.setup()
    assert np.diff(dm.store.events.user_offsets)[1:].min() >= HIST + 3
    samples = bench_train.train_samples(dm, HIST)
    assert 0.5 * len(dm.store.splits["train"]) < len(samples) < len(dm.store.splits["train"])
    assert bench_train.history_lengths(samples, HIST) == (HIST, 1.0)
    with bench_train.train_split(dm, samples):
        loader = dm.train_dataloader()
    assert len(dm.store.splits["train"]) > len(samples)  # restored
    assert all(batch.hist_mask.all() for batch in loader)  # no padding anywhere


def test_length_groups_are_passed_only_when_given(
    dm: SeqDataModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = []
    monkeypatch.setattr(bench_train, "BST", lambda schema, **kw: seen.append(kw))
    bench_train.build_net("bst", dm.schema, HIST)
    bench_train.build_net("bst", dm.schema, HIST, length_groups=0)
    assert "length_groups" not in seen[0] and seen[1]["length_groups"] == 0


HAS_LENGTH_GROUPS = "length_groups" in inspect.signature(BST).parameters


@pytest.mark.parametrize(
    ("model", "device_store", "length_groups"),
    [
        ("bst", False, None),
        ("atrank", False, None),
        ("bst", True, None),
        pytest.param(
            "bst",
            False,
            0,
            marks=pytest.mark.skipif(not HAS_LENGTH_GROUPS, reason="no length_groups yet"),
        ),
    ],
)
def test_one_benchmark_row_runs_end_to_end(
    dm: SeqDataModule,
    model: str,
    device_store: bool,
    length_groups: int | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bench_train, "DEVICE_STORE", device_store)
    row = bench_train.bench(
        model, 16, HIST, dm, steps=3, precision="32", n_batches=3, length_groups=length_groups
    )
    for key in (
        "e2e",
        "e2e median",
        "e2e best",
        "compute",
        "reference",
        "ceiling",
        "reference best",
        "ceiling best",
        "gflops",
        "mflop/sample",
    ):
        assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])
    # a reference step and a ceiling pass after every timed e2e step (and the last one)
    assert row["windows"] == 3 + 1
    assert 0 < row["input_share"] < 1
    assert row["e2e best"] >= max(
        row["e2e"], row["e2e median"]
    )  # the fastest step beats mean and median
    assert row["model"] == model + ("" if length_groups is None else f" lg{length_groups}")
