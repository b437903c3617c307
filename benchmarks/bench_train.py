"""Training throughput of BST and ATRank against this machine's FLOP-bound ceiling.

Prints, for each model and setting, samples/s of:
  e2e        our real path: SeqDataModule (store + vectorised gather) -> Lightning Trainer,
             timed from one batch start to the next (input, step and hooks)
  compute    our model's train step on pre-built batches (no input pipeline)
  reference  the same model written plainly in PyTorch, dense torch.optim.Adam, pre-built
             tensors: BST with nn.TransformerEncoderLayer; ATRank as the reference TensorFlow
             code reads (heads split and concatenated along the batch, masks by `where`)
  ceiling    the step with nothing but its matrix products: every mm/addmm/bmm one training
             step of our model runs (forward and backward, recorded with their shapes and
             strides; on CUDA also the fused attention kernels) is replayed alone after every
             timed step of every path, each once, times its count: the fastest such pass;
             samples/s at that
             time. GFLOP/s = the step's FLOPs (torch's FlopCounterMode) over that time.
and the ratios e2e/ceiling, e2e/reference, ceiling/reference (the most any implementation of
the model could gain over the reference on this machine) and the input pipeline's share of the
step. Every rate is that of the fastest of the timed steps, and the ceiling's the fastest of
its passes, sampled between those steps: on this VM the same GEMM runs anywhere between 80 and
150 GFLOP/s from one 0.2 s window to the next, so best against best, taken in the same
windows, is the stable comparison; `e2e median` shows the typical step.
`--embeddings dense sparse` runs each model both with dense embedding gradients and with
row-wise ones (`sparse_embeddings=True`, lazy Adam on the touched rows; BST only).
Data: a random store with Electronics shapes (63k items, 801 categories, 192k users).

    python benchmarks/bench_train.py --batch 256 1024 --hist 20 50 --models bst atrank \
        --embeddings dense sparse
    python benchmarks/bench_train.py --device cuda --precision bf16-mixed --batch 4096 16384   # GPU

`--device cuda` moves the model, the pre-built batches and the ceiling's replayed matrix products
to the GPU (timings synchronise) and keeps the store on the GPU (`data.device_store`: batches
gathered there; `--store host` gathers on the CPU and copies each batch); `--precision
bf16-mixed|16-mixed` runs every path under autocast (the replayed products are recorded in the
dtypes autocast gives them).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import polars as pl
import rich
import torch
import torch.nn.functional as F
from rich.table import Table
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from seqrank.data.datamodule import SeqDataModule
from seqrank.lit.ranking import RankingModule
from seqrank.models.atrank import ATRank
from seqrank.models.bst import BST
from seqrank.models.layers.time import log2_time_bucket
from seqrank.optim import Adam


class RandomElectronics:
    """A source with Electronics shapes and random events (throughput does not need signal)."""

    unknown_cate_name = None

    def __init__(self, users: int = 192_403, items: int = 63_001, cates: int = 801, events: int = 1_689_188) -> None:
        self.shape = (users, items, cates, events)

    def prepare(self) -> None:
        pass

    def fingerprint(self) -> dict:
        return {"source": "random_electronics", "shape": self.shape}

    def read(self, on_bad_line: str = "error") -> tuple[pl.DataFrame, dict]:
        users, items, cates, n = self.shape
        rng = np.random.default_rng(0)
        user = np.sort(rng.integers(0, users, n))
        item = rng.integers(0, items, n)
        item_cate = rng.integers(0, cates, items)
        return pl.DataFrame({
            "user_id": user.astype(str), "item_id": item.astype(str), "cate_id": item_cate[item].astype(str),
            "timestamp": rng.integers(1_300_000_000, 1_400_000_000, n), "behavior": np.ones(n, np.int8),
        }), {}

    def oracle(self) -> None:
        return None


def build_net(name: str, schema, hist: int, sparse: bool = False) -> nn.Module:  # noqa: ANN001
    if name == "bst":
        return BST(schema, embed_dim=64, num_heads=8, num_layers=1, dropout=0.2, max_len=hist,
                   sparse_embeddings=sparse)
    if sparse:
        raise ValueError("ATRank has no sparse_embeddings option")
    return ATRank(schema, embed_dim=64, num_heads=8, num_layers=1, max_len=hist)


class PlainBST(nn.Module):
    """BST as a straightforward PyTorch user writes it: nn.TransformerEncoderLayer (post-norm,
    LeakyReLU FFN; it also drops out inside the FFN), log2 time-gap positions, padded outputs
    zeroed, all L+1 outputs flattened into the MLP. The same function as seqrank's BST
    (tests/test_benchmarks.py checks the logits with copied weights)."""

    def __init__(self, items: int, cates: int, hist: int, d: int = 64, buckets: int = 12) -> None:
        super().__init__()
        self.item, self.cate = nn.Embedding(items, d), nn.Embedding(cates, d)
        self.time = nn.Embedding(buckets, 2 * d)
        self.enc = nn.TransformerEncoderLayer(2 * d, 8, 2 * d, 0.2, F.leaky_relu, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear((hist + 1) * 2 * d, 1024), nn.LeakyReLU(), nn.Linear(1024, 512),
                                 nn.LeakyReLU(), nn.Linear(512, 256), nn.LeakyReLU(), nn.Linear(256, 1))

    def forward(self, hi, hc, ti, tc, bucket, pad):  # noqa: ANN001, ANN201
        items = torch.cat([hi, ti[:, None]], 1)  # (B, L+1), the target last
        x = torch.cat([self.item(items), self.cate(torch.cat([hc, tc[:, None]], 1))], -1) + self.time(bucket)
        x = self.enc(x, src_key_padding_mask=pad)
        x = x.masked_fill(pad[..., None], 0.0)
        return self.mlp(x.flatten(1)).squeeze(-1)


class PlainATRank(nn.Module):
    """ATRank as the reference TensorFlow code (jinze1994/ATRank, atrank/model.py) reads, in
    plain PyTorch: one-hot time concatenated and a dense layer, ReLU dense Q/K/V, heads split
    and concatenated along the batch, masks by `where`, dropout on the weights, residual +
    layer norm, FFN (D/4, D), a vanilla attention from the target (projected by the same dense,
    as seqrank's ATRank does); score = bias + <u, i>. The same function as seqrank's ATRank
    on histories with at least one event (tests/test_benchmarks.py)."""

    def __init__(self, items: int, cates: int, d: int = 64, heads: int = 8, buckets: int = 12) -> None:
        super().__init__()
        D = 2 * d
        self.heads, self.buckets = heads, buckets
        self.item, self.cate, self.item_b = nn.Embedding(items, d), nn.Embedding(cates, d), nn.Embedding(items, 1)
        self.hist = nn.Linear(D + buckets, D)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"q": nn.Linear(D, D), "k": nn.Linear(D, D), "v": nn.Linear(D, D),
                           "ln": nn.LayerNorm(D, eps=1e-8), "f1": nn.Linear(D, D // 4), "f2": nn.Linear(D // 4, D),
                           "ln2": nn.LayerNorm(D, eps=1e-8)})
            for _ in range(2))
        self.drop = nn.Dropout(0.0)

    def mha(self, blk, queries, keys, kmask, qmask):  # noqa: ANN001, ANN201
        H = self.heads
        Q, K, V = (F.relu(blk[n](x)) for n, x in (("q", queries), ("k", keys), ("v", keys)))
        Q_, K_, V_ = (torch.cat(torch.split(t, t.shape[-1] // H, dim=2), dim=0) for t in (Q, K, V))  # (hB, T, C/h)
        out = Q_ @ K_.transpose(1, 2) / K_.shape[-1] ** 0.5  # (hB, Tq, Tk)
        kmask_ = kmask.repeat(H, 1)[:, None, :].expand_as(out)
        out = torch.where(kmask_, out, torch.full_like(out, -(2.0**32) + 1))
        out = out.softmax(-1) * qmask.repeat(H, 1)[:, :, None].to(out.dtype)
        out = self.drop(out) @ V_  # (hB, Tq, C/h)
        out = torch.cat(torch.split(out, out.shape[0] // H, dim=0), dim=2)  # (B, Tq, C)
        out = blk["ln"](out + queries)
        return blk["ln2"](out + blk["f2"](F.relu(blk["f1"](out))))

    def forward(self, hi, hc, bucket, mask, ti, tc):  # noqa: ANN001, ANN201
        h = torch.cat([self.item(hi), self.cate(hc), F.one_hot(bucket, self.buckets).float()], -1)
        h = self.hist(h)
        i = torch.cat([self.item(ti), self.cate(tc)], -1)
        i = self.hist(torch.cat([i, i.new_zeros(len(i), self.buckets)], -1))  # the same dense, no time
        h = self.mha(self.blocks[0], h, h, mask, mask)
        u = self.mha(self.blocks[1], i[:, None], h, mask, torch.ones_like(mask[:, :1]))[:, 0]
        return self.item_b(ti).squeeze(-1) + (u * i).sum(-1)


DEVICE = torch.device("cpu")
DEVICE_STORE = False  # gather batches on DEVICE from a device-resident store


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def autocast(precision: str):  # noqa: ANN201
    """The autocast context of a Lightning precision string (`32`, `bf16-mixed`, `16-mixed`)."""
    if precision.startswith("bf16"):
        return torch.autocast(DEVICE.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(DEVICE.type, dtype=torch.float16)
    return contextlib.nullcontext()


def timed(fn, steps: int, warmup: int = 3, stat=np.min) -> float:  # noqa: ANN001
    """Seconds per call of fn over `steps` calls after `warmup` calls: the fastest by default."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return float(stat(times))


MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.baddbmm.default}
# CUDA's fused attention kernels (SDPA) count as matrix products: their FLOPs are the attention's
for _name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_cudnn_attention"):
    for _op in (_name, _name + "_backward"):
        if hasattr(torch.ops.aten, _op):
            MATMULS.add(getattr(torch.ops.aten, _op).default)


class TensorSpec(tuple):
    """(shape, stride, dtype) of a recorded tensor argument."""


class RecordMatmuls(TorchDispatchMode):
    """Counts every matrix-product call by (op, shapes, strides, scalar arguments)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func in MATMULS and all(not isinstance(v, torch.Tensor) for v in kwargs.values()):
            spec = tuple(TensorSpec((tuple(a.shape), tuple(a.stride()), a.dtype)) if isinstance(a, torch.Tensor)
                         else a for a in args)
            self.calls[(func, spec, tuple(sorted(kwargs.items())))] += 1
        return func(*args, **kwargs)


def _random_strided(shape: tuple, stride: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A random tensor with exactly this layout (also overlapping ones, e.g. expanded)."""
    size = 1 + sum((n - 1) * st for n, st in zip(shape, stride)) if all(shape) else 0
    if not dtype.is_floating_point:  # e.g. the RNG state arguments of fused attention
        return torch.zeros(size, dtype=dtype, device=DEVICE).as_strided(shape, stride)
    return torch.randn(size, dtype=dtype, device=DEVICE).as_strided(shape, stride)


class Ceiling:
    """The recorded matrix products, replayed alone on random inputs of the same layouts.

    `sample()` is one pass: each product runs once, and the pass's ceiling time is the sum of
    count x its time. The benchmark samples a pass after every timed step of every path (ours,
    e2e, reference), so passes and steps see the same stretches of the machine's speed, and
    `seconds()` is the fastest pass - compared with the fastest step (a sum of per-product
    bests would be faster than any pass the machine ever ran). A product that cannot be
    replayed on random inputs is reported and left out (the ceiling then only rises).
    """

    def __init__(self, calls: Counter) -> None:
        self.runs = []
        for (func, spec, kwargs), count in calls.items():
            args = [_random_strided(*a) if isinstance(a, TensorSpec) else a for a in spec]
            fn = functools.partial(func, *args, **dict(kwargs))
            try:
                timed(fn, 1, warmup=1)
            except RuntimeError as e:
                rich.print(f"[yellow]ceiling: {func} x{count} left out, cannot replay it: {e}")
                continue
            self.runs.append((count, fn))
        self.best = float("inf")

    def sample(self) -> float:
        """One pass over the products; returns the seconds it took."""
        t0 = time.perf_counter()
        self.best = min(self.best, sum(count * timed(fn, 1, warmup=0) for count, fn in self.runs))
        return time.perf_counter() - t0

    def seconds(self) -> float:
        return self.best


def interleaved(fn, ceiling: Ceiling, steps: int, warmup: int = 3) -> float:  # noqa: ANN001
    """Fastest seconds per call of fn over `steps` calls, a ceiling pass after each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        times.append(timed(fn, 1, warmup=0))
        ceiling.sample()
    return min(times)


def record_step(step) -> tuple[float, Counter]:  # noqa: ANN001
    """FLOPs and matrix-product calls of one call of `step` (a whole training step)."""
    rec = RecordMatmuls()
    with FlopCounterMode(display=False) as fc, rec:
        step()
    return fc.get_total_flops(), rec.calls


def bench(model: str, B: int, hist: int, dm: SeqDataModule, steps: int, precision: str,
          sparse: bool = False, compile: bool = False) -> dict:
    schema = dm.schema
    dm.batch_size, dm.max_len = B, hist
    dm.device_store = str(DEVICE) if DEVICE_STORE else False
    loader = dm.train_dataloader()
    it = iter(loader)
    batches = [next(it).to(DEVICE) for _ in range(4)]
    # compute only: our model, fused Adam (row-wise on sparse embeddings), pre-built batches
    torch.manual_seed(0)
    net = build_net(model, schema, hist, sparse).to(DEVICE)
    opt = Adam(net.parameters(), 1e-3, fused=True)
    k = [0]

    def step() -> None:
        b = batches[k[0] % len(batches)]
        k[0] += 1
        with autocast(precision):
            loss = F.binary_cross_entropy_with_logits(net(b).float(), b.label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up
        step()
    flops, calls = record_step(step)
    ceiling = Ceiling(calls)
    t_compute = interleaved(step, ceiling, steps)
    t_gather = timed(lambda: next(it), steps)
    # end to end through Lightning
    module = RankingModule(build_net(model, schema, hist, sparse), compile=compile,
                           optimizer=lambda params: Adam(params, 1e-3, fused=True))
    trainer = L.Trainer(max_steps=steps + 3, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator=DEVICE.type, devices=1,
                        precision=precision, use_distributed_sampler=False, num_sanity_val_steps=0)
    timer = _StepTimer(warmup=3, ceiling=ceiling)
    trainer.callbacks.append(timer)
    trainer.fit(module, train_dataloaders=loader)
    t_e2e, t_e2e_median = timer.per_step(), timer.per_step(np.median)
    # the plain reference
    t_ref = interleaved(reference_step(model, schema, hist, batches[0], precision), ceiling, steps)
    t_gemm = ceiling.seconds()
    return {
        "model": model + (" sparse" if sparse else "") + (" compiled" if compile else ""), "batch": B,
        "hist": hist, "e2e": B / t_e2e, "e2e median": B / t_e2e_median, "compute": B / t_compute, "reference": B / t_ref, "ceiling": B / t_gemm,
        "gflops": flops / t_gemm / 1e9, "mflop/sample": flops / B / 1e6, "input_share": t_gather / t_e2e,
    }


def reference_step(model: str, schema, hist: int, batch, precision: str):  # noqa: ANN001, ANN201
    """One training step of the plain reference of `model` on a fixed batch, dense Adam."""
    torch.manual_seed(0)
    b = batch
    if model == "bst":
        ref = PlainBST(schema.num_items, schema.num_cates, hist).to(DEVICE)
        pad = ~torch.cat([b.hist_mask, torch.ones(len(b), 1, dtype=torch.bool, device=DEVICE)], 1)
        bucket = log2_time_bucket(F.pad(b.hist_gap, (0, 1)), 12)  # the target's gap is 0
        inputs = (b.hist_item, b.hist_cate, b.target_item, b.target_cate, bucket, pad)
    else:
        ref = PlainATRank(schema.num_items, schema.num_cates).to(DEVICE)
        bucket = log2_time_bucket(b.hist_gap, 12)
        inputs = (b.hist_item, b.hist_cate, bucket, b.hist_mask, b.target_item, b.target_cate)
    opt = torch.optim.Adam(ref.parameters(), 1e-3)

    def step() -> None:
        with autocast(precision):
            logits = ref(*inputs).float()
        loss = F.binary_cross_entropy_with_logits(logits, b.label)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


class _StepTimer(L.Callback):
    """Time from one batch start to the next: fetching the batch, the step and all hooks; a
    ceiling pass runs after each step, its time taken out."""

    def __init__(self, warmup: int, ceiling: Ceiling) -> None:
        self.warmup, self.ceiling, self.starts, self.excluded = warmup, ceiling, [], []

    def on_train_batch_start(self, *args) -> None:  # noqa: ANN002
        sync()
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, *args) -> None:  # noqa: ANN002
        sync()
        self.excluded.append(self.ceiling.sample() if len(self.starts) > self.warmup else 0.0)

    def per_step(self, stat=np.min) -> float:  # noqa: ANN001
        steps = np.diff(self.starts) - np.asarray(self.excluded[: len(self.starts) - 1])
        return float(stat(steps[self.warmup :]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["bst", "atrank"])
    p.add_argument("--batch", nargs="+", type=int, default=[256, 1024])
    p.add_argument("--hist", nargs="+", type=int, default=[20, 50])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--precision", default="32", help="32 | bf16-mixed | 16-mixed (Lightning's names)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--embeddings", nargs="+", choices=["dense", "sparse"], default=["dense"],
                   help="embedding gradients: dense, or sparse rows with lazy Adam (BST only)")
    p.add_argument("--compile", action="store_true", help="e2e with RankingModule(compile=True)")
    p.add_argument("--store", choices=["host", "device"], default=None,
                   help="where batches are gathered (data.device_store); default: device on cuda, host on cpu")
    p.add_argument("--work-dir", default="data/bench")
    a = p.parse_args()
    global DEVICE, DEVICE_STORE
    DEVICE = torch.device(a.device)
    DEVICE_STORE = (a.store or ("device" if a.device == "cuda" else "host")) == "device"
    if a.threads:
        torch.set_num_threads(a.threads)
    dm = SeqDataModule(RandomElectronics(), name="random_electronics", processed_dir=Path(a.work_dir) / "processed")
    dm.prepare_data()
    dm.setup()
    rows = [bench(m, B, h, dm, a.steps, a.precision, e == "sparse", a.compile)
            for m in a.models for e in a.embeddings for B in a.batch for h in a.hist
            if m == "bst" or e == "dense"]
    where = torch.cuda.get_device_name() if DEVICE.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    store = "on the device" if DEVICE_STORE else "on the host"
    t = Table(title=f"training samples/s — {where}, precision {a.precision}, batches gathered {store}")
    for c in ("model", "batch", "hist", "e2e", "e2e median", "compute", "reference", "ceiling", "e2e/ceiling", "e2e/ref",
              "ceiling/ref", "input share", "GFLOP/s", "MFLOP/sample"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(r["model"], str(r["batch"]), str(r["hist"]), f"{r['e2e']:.0f}", f"{r['e2e median']:.0f}",
                  f"{r['compute']:.0f}",
                  f"{r['reference']:.0f}", f"{r['ceiling']:.0f}", f"{r['e2e'] / r['ceiling']:.0%}",
                  f"{r['e2e'] / r['reference']:.2f}x", f"{r['ceiling'] / r['reference']:.2f}x",
                  f"{r['input_share']:.1%}", f"{r['gflops']:.0f}",
                  f"{r['mflop/sample']:.1f}")
    rich.print(t)


if __name__ == "__main__":
    main()
