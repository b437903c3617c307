"""Training throughput of BST and ATRank against this machine's FLOP-bound ceiling.

Prints, for each model and setting, samples/s (batch size over a per-step time) of:
  e2e          our real path: SeqDataModule (store + vectorised gather) -> Lightning Trainer,
               a step timed from one batch start to the next (input, step and hooks; the
               ceiling pass after it taken out), on fresh batches from the loader: the MEAN of
               the `--steps` timed steps (after 3 warm-up steps). Step work varies with the
               batch's history lengths (the models' length groups), so a fastest step would be
               an easy batch
  e2e median   the same steps' median; e2e best: their fastest
  reference    the same model written plainly in PyTorch, dense torch.optim.Adam, on the
               pre-built batches below: BST with nn.TransformerEncoderLayer; ATRank as the
               reference TensorFlow code reads (heads split and concatenated along the batch,
               masks by `where`); both always pad to --hist. One reference step runs after every
               timed e2e step (its time taken out of the e2e step): the MEAN of those steps
  ceiling      the steps with nothing but their matrix products: every mm/addmm/bmm that the
               training steps of our model on ALL the pre-built batches run (forward and
               backward, recorded with their shapes and strides, in place and out= ones too;
               the products inside our fused CPU attention kernel as the bmm's they are, a
               ragged call's as one bmm per product at a FLOP-equivalent shape; on
               CUDA the fused attention kernels whole) is replayed alone, each once, times
               its count: a pass / the number of batches is a per-step average over those
               batches. A pass runs after
               every timed e2e step (as the reference step): the MEAN of those passes
  compute      our model's train step on `--batches` pre-built batches (no input pipeline): the
               fastest of `--steps` timed cycles (each batch once) / the number of batches;
               cycles of the reference on the same batches run in turns with them, a ceiling
               pass after each cycle
  GFLOP/s      the recorded steps' FLOPs (torch's FlopCounterMode) over the ceiling
  MFLOP/sample the recorded steps' FLOPs / (batches x batch size): the average over the batches
and the ratios e2e/ceiling, e2e/ref and ceiling/ref (the most any implementation of the model
could gain over the reference on this machine): means over the same stretches of time, one
e2e step, one ceiling pass and one reference step after another; compute/ceiling and
compute/ref: the fastest compute cycle against the fastest pass and the fastest reference
cycle of the same rounds (no input pipeline, no Lightning: the model's kernels alone); and
input share (the mean time the loader takes to gather a batch / the mean e2e step). On this VM
the same GEMM runs anywhere between 80 and 150 GFLOP/s from one 0.2 s window to the next, so
only figures taken in the same windows, with the same statistic, are compared: e2e is a mean
(its batches differ from step to step, and with length groups so does its work), so the
ceiling and reference beside it are means over the same windows.
`--embeddings auto dense sparse lazy` runs each model with the configs' default
(`sparse_embeddings="auto"`: on one CPU process, row gradients with the dense-equivalent update
below; dense gradients on CUDA), with dense embedding gradients, with row ones
(`sparse_embeddings=True`) and `seqrank.optim.Adam`'s dense-equivalent update (one C++ pass over
the table, no dense gradient), and with row ones and lazy Adam on the touched rows (`lazy=True`:
not dense Adam). The default is `auto` alone.
`--length-groups N` passes `length_groups=N` to the models (0: pad every batch to --hist, the
old path); without it the models' default applies.
Data: a random store with Electronics shapes (63k items, 801 categories, 192k users, 1.69M
events); `--lengths` picks the events per user (`RandomElectronics`): `electronics` (an assumed
5-core-like law, the default), `poisson` (uniform random users) or `full` (long users; only
training samples with a full history at --hist). A line before the table gives the training
histories' mean length and full share at each --hist (how much of a padded batch is padding).

    python benchmarks/bench_train.py --batch 256 1024 --hist 20 50 --models bst atrank \
        --embeddings auto dense lazy
    python benchmarks/bench_train.py --device cuda --precision bf16-mixed --batch 4096 16384   # GPU
    python benchmarks/bench_train.py --length-groups 0 --lengths full   # padded path, no padding

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
import rich.console
import torch
import torch.nn.functional as F
from rich.table import Table
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from seqrank.data.batching import SampleArrays
from seqrank.data.datamodule import SeqDataModule
from seqrank.lit.ranking import RankingModule
from seqrank.models.atrank import ATRank
from seqrank.models.bst import BST
from seqrank.models.layers.time import log2_time_bucket
from seqrank.optim import Adam, resolve_sparse_embeddings

LENGTHS = ("electronics", "poisson", "full")
FIVE_CORE = 5  # the 5-core's fewest events a user


def electronics_counts(
    users: int, events: int, rng: np.random.Generator, alpha: float = 2.3, cap: int = 400
) -> np.ndarray:
    """Events per user under an ASSUMED Electronics-5-core-like law (not the real counts, which
    this benchmark does not have): n = 5 + floor(s * T), T the tail X - 5 of a Pareto X
    (minimum 5, shape `alpha`), capped at `cap`, with the scale s (about 1) that makes the counts
    sum to exactly `events` (the last few events go to the users nearest their next count). With
    the default shape that is the real 5-core's minimum (5) and mean (1,689,188 events / 192,403
    users = 8.78); the spread is a guess. Raises ValueError when no such counts exist."""
    need = events - FIVE_CORE * users  # events beyond the minimum
    if users < 1 or not 0 <= need <= (cap - FIVE_CORE) * users:
        raise ValueError(
            f"{events} events cannot give {users} users {FIVE_CORE}..{cap} events each"
        )
    tail = FIVE_CORE * (1.0 - rng.random(users)) ** (-1.0 / alpha) - FIVE_CORE

    def extra(scale: float) -> np.ndarray:
        return np.minimum(np.floor(scale * tail), cap - FIVE_CORE)

    lo, hi = 0.0, 1.0
    while extra(hi).sum() < need:
        hi *= 2
    for _ in range(60):  # the largest scale whose counts do not exceed `events`
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if extra(mid).sum() <= need else (lo, mid)
    n = FIVE_CORE + extra(lo).astype(np.int64)
    frac = np.where(n < cap, lo * tail - np.floor(lo * tail), -1.0)
    n[np.argsort(-frac)[: need - int(n.sum() - FIVE_CORE * users)]] += 1
    return n


class RandomElectronics:
    """A source with Electronics shapes and random events (throughput does not need signal), and
    a chosen law of events per user, since with length groups the work of a step depends on the
    histories' lengths.

    lengths:
        electronics  `electronics_counts`: every user >= 5 events, mean events / users (8.78 by
                     default), a Pareto tail (an assumed law with the real 5-core's minimum and
                     mean, not the real distribution)
        poisson      each event's user uniform at random (~Poisson(events / users) a user, some
                     with fewer than 5), the benchmark's old data
        full         every user 4 x `hist` events (events // that users; `users` is ignored), so
                     most training targets have >= `hist` earlier events; the benchmark trains on
                     those only (`train_samples`): nothing is padding at any --hist <= `hist`
    Items, categories and timestamps are uniform at random (the preprocessing sorts by time).
    """

    unknown_cate_name = None

    def __init__(
        self,
        users: int = 192_403,
        items: int = 63_001,
        cates: int = 801,
        events: int = 1_689_188,
        lengths: str = "electronics",
        hist: int = 50,
    ) -> None:
        if lengths not in LENGTHS:
            raise ValueError(f"lengths={lengths!r}; expected one of {LENGTHS}")
        self.shape, self.lengths, self.hist = (users, items, cates, events), lengths, hist

    def prepare(self) -> None:
        pass

    def fingerprint(self) -> dict:
        fp = {"source": "random_electronics", "shape": self.shape, "lengths": self.lengths}
        return {**fp, "hist": self.hist} if self.lengths == "full" else fp

    def event_users(self, rng: np.random.Generator) -> np.ndarray:
        """The user of every event, sorted."""
        users, _, _, events = self.shape
        if self.lengths == "poisson":
            return np.sort(rng.integers(0, users, events))
        if self.lengths == "full":
            per_user = 4 * self.hist
            counts = np.full(max(events // per_user, 1), per_user)
        else:
            counts = electronics_counts(users, events, rng)
        return np.repeat(np.arange(len(counts)), counts)

    def read(self, on_bad_line: str = "error") -> tuple[pl.DataFrame, dict]:
        _, items, cates, _ = self.shape
        rng = np.random.default_rng(0)
        user = self.event_users(rng)
        n = len(user)
        item = rng.integers(0, items, n)
        item_cate = rng.integers(0, cates, items)
        return pl.DataFrame(
            {
                "user_id": user.astype(str),
                "item_id": item.astype(str),
                "cate_id": item_cate[item].astype(str),
                "timestamp": rng.integers(1_300_000_000, 1_400_000_000, n),
                "behavior": np.ones(n, np.int8),
            }
        ), {}

    def oracle(self) -> None:
        return None


def train_samples(dm: SeqDataModule, hist: int) -> SampleArrays:
    """The training samples a row trains on: the store's, or under `full` lengths only those with
    a full history at `hist` (target position >= hist). Every event after a user's first is a
    training target, so a user's first targets have short histories however long the user is."""
    s = dm.store.splits["train"]
    if getattr(dm.source, "lengths", None) != "full":
        return s
    keep = np.flatnonzero(np.asarray(s.pos) >= hist)
    return SampleArrays(
        *(np.asarray(getattr(s, f))[keep] for f in ("user", "pos", "target", "label"))
    )


@contextlib.contextmanager
def train_split(dm: SeqDataModule, samples: SampleArrays):  # noqa: ANN201
    """dm's training split is `samples` inside (loaders made there keep them)."""
    splits = dm.store.splits
    saved, splits["train"] = splits["train"], samples
    try:
        yield
    finally:
        splits["train"] = saved


def history_lengths(samples: SampleArrays, hist: int) -> tuple[float, float]:
    """(mean history length, share of samples with a full one) at `hist`: a padded batch is
    1 - mean / hist padding."""
    n = np.minimum(np.asarray(samples.pos), hist)
    return float(n.mean()), float((n == hist).mean())


def build_net(
    name: str,
    schema,  # noqa: ANN001
    hist: int,
    sparse: bool | str = False,
    length_groups: int | None = None,
) -> nn.Module:
    """Our model; `length_groups` is passed only when given (None: the model's default)."""
    kw = {} if length_groups is None else {"length_groups": length_groups}
    if name == "bst":
        return BST(
            schema,
            embed_dim=64,
            num_heads=8,
            num_layers=1,
            dropout=0.2,
            max_len=hist,
            sparse_embeddings=sparse,
            **kw,
        )
    return ATRank(
        schema,
        embed_dim=64,
        num_heads=8,
        num_layers=1,
        max_len=hist,
        sparse_embeddings=sparse,
        **kw,
    )


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
        self.mlp = nn.Sequential(
            nn.Linear((hist + 1) * 2 * d, 1024),
            nn.LeakyReLU(),
            nn.Linear(1024, 512),
            nn.LeakyReLU(),
            nn.Linear(512, 256),
            nn.LeakyReLU(),
            nn.Linear(256, 1),
        )

    def forward(self, hi, hc, ti, tc, bucket, pad):  # noqa: ANN001, ANN201
        items = torch.cat([hi, ti[:, None]], 1)  # (B, L+1), the target last
        x = torch.cat(
            [self.item(items), self.cate(torch.cat([hc, tc[:, None]], 1))], -1
        ) + self.time(bucket)
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

    def __init__(
        self, items: int, cates: int, d: int = 64, heads: int = 8, buckets: int = 12
    ) -> None:
        super().__init__()
        D = 2 * d
        self.heads, self.buckets = heads, buckets
        self.item, self.cate, self.item_b = (
            nn.Embedding(items, d),
            nn.Embedding(cates, d),
            nn.Embedding(items, 1),
        )
        self.hist = nn.Linear(D + buckets, D)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "q": nn.Linear(D, D),
                    "k": nn.Linear(D, D),
                    "v": nn.Linear(D, D),
                    "ln": nn.LayerNorm(D, eps=1e-8),
                    "f1": nn.Linear(D, D // 4),
                    "f2": nn.Linear(D // 4, D),
                    "ln2": nn.LayerNorm(D, eps=1e-8),
                }
            )
            for _ in range(2)
        )
        self.drop = nn.Dropout(0.0)

    def mha(self, blk, queries, keys, kmask, qmask):  # noqa: ANN001, ANN201
        H = self.heads
        Q, K, V = (F.relu(blk[n](x)) for n, x in (("q", queries), ("k", keys), ("v", keys)))
        Q_, K_, V_ = (
            torch.cat(torch.split(t, t.shape[-1] // H, dim=2), dim=0) for t in (Q, K, V)
        )  # (hB, T, C/h)
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
        i = self.hist(
            torch.cat([i, i.new_zeros(len(i), self.buckets)], -1)
        )  # the same dense, no time
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


# every overload of these counts: in place (`addmm_`, the ragged first MLP layer's weight
# gradient) and `out=` (its forward) products are model math as much as `mm`
aten = torch.ops.aten
MATMULS = {aten.mm, aten.addmm, aten.addmm_, aten.bmm, aten.baddbmm, aten.baddbmm_}
# CUDA's fused attention kernels (SDPA) count as matrix products: their FLOPs are the attention's
for _name in (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
):
    for _op in (_name, _name + "_backward"):
        if hasattr(aten, _op):
            MATMULS.add(getattr(aten, _op))


def _raw(formula):  # noqa: ANN001, ANN202
    """A registered formula (already taking tensors) as a custom mapping FlopCounterMode keeps
    as it is."""

    def count(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        return formula(*args, **kwargs)

    count._get_raw = True
    return count


# torch's FlopCounterMode knows the out-of-place products (`addmm.out` is an overload of addmm)
# but not the in-place ones: the same FLOPs as their out-of-place forms
FLOPS_IN_PLACE = {
    aten.addmm_: _raw(flop_registry[aten.addmm]),
    aten.baddbmm_: _raw(flop_registry[aten.baddbmm]),
}


class TensorSpec(tuple):
    """(shape, stride, dtype) of a recorded tensor argument."""


def _spec(a):  # noqa: ANN001, ANN202
    return (
        TensorSpec((tuple(a.shape), tuple(a.stride()), a.dtype))
        if isinstance(a, torch.Tensor)
        else a
    )


class RecordMatmuls(TorchDispatchMode):
    """Counts every matrix-product call by (op, shapes, strides, scalar arguments); tensor
    keyword arguments (`out=`) are recorded by layout like the others."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func.overloadpacket in MATMULS:
            spec = tuple(_spec(a) for a in args)
            self.calls[(func, spec, tuple(sorted((k, _spec(v)) for k, v in kwargs.items())))] += 1
        return func(*args, **kwargs)


def _random_strided(shape: tuple, stride: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A random tensor with exactly this layout (also overlapping ones, e.g. expanded)."""
    size = 1 + sum((n - 1) * st for n, st in zip(shape, stride, strict=True)) if all(shape) else 0
    if not dtype.is_floating_point:  # e.g. the RNG state arguments of fused attention
        return torch.zeros(size, dtype=dtype, device=DEVICE).as_strided(shape, stride)
    return torch.randn(size, dtype=dtype, device=DEVICE).as_strided(shape, stride)


class Ceiling:
    """The recorded matrix products of `steps` training steps, replayed alone on random inputs
    of the same layouts.

    `sample()` is one pass: each product runs once, and the pass's ceiling time is the sum of
    count x its time, i.e. all `steps` steps' products. The benchmark samples a pass after every
    timed cycle or step of every path (ours, e2e, reference), so passes and steps see the same
    stretches of the machine's speed, and `seconds()` is the fastest pass / `steps`, per step
    (a sum of per-product bests would be faster than any pass the machine ever ran). The steps
    are on different batches because a step's work depends on its batch's history lengths. A
    product that cannot be replayed on random inputs is reported and left out (the ceiling then
    only rises).
    """

    def __init__(self, calls: Counter, steps: int = 1) -> None:
        self.steps = steps
        self.runs = []
        for (func, spec, kwargs), count in calls.items():
            args = [_random_strided(*a) if isinstance(a, TensorSpec) else a for a in spec]
            kw = {k: _random_strided(*v) if isinstance(v, TensorSpec) else v for k, v in kwargs}
            fn = functools.partial(func, *args, **kw)
            try:
                timed(fn, 1, warmup=1)
            except RuntimeError as e:
                rich.print(f"[yellow]ceiling: {func} x{count} left out, cannot replay it: {e}")
                continue
            self.runs.append((count, fn))
        self.best = float("inf")
        self.last = float("inf")

    def sample(self) -> float:
        """One pass over the products (its ceiling time in `last`); returns the seconds it took."""
        t0 = time.perf_counter()
        self.last = sum(count * timed(fn, 1, warmup=0) for count, fn in self.runs)
        self.best = min(self.best, self.last)
        return time.perf_counter() - t0

    def seconds(self) -> float:
        """The fastest pass per recorded step."""
        return self.best / self.steps


def interleaved(fns: list, ceiling: Ceiling, steps: int, warmup: int = 1) -> list[float]:
    """Fastest seconds per call of each of `fns` (cycles of steps) over `steps` rounds; a round
    calls each fn once, a ceiling pass after each, so all of them see the same stretches of
    the machine's speed."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(steps):
        for fn, t in zip(fns, times, strict=True):
            t.append(timed(fn, 1, warmup=0))
            ceiling.sample()
    return [min(t) for t in times]


class RecordFusedAttention:
    """Stands in for the fused C++ attention kernel (`seqrank.kernels`) while steps are
    recorded, and counts its products as the batched matrix products they are: forward
    S = Q K^T and O = P V, backward dP = dO V^T, dV = P^T dO, dQ = dS K and dK = dS^T Q, each
    (B*H) products of the heads' shapes. The kernel runs them inside one C++ call that no
    dispatch mode sees; they are model FLOPs as much as the projections (and on CUDA, SDPA's
    kernels count whole)."""

    def __init__(self, ext) -> None:  # noqa: ANN001
        self.ext = ext
        self.calls: Counter = Counter()
        self.flops = 0

    def _count(  # noqa: PLR0913
        self,
        B: int,
        Lq: int,
        Lk: int,
        H: int,
        d: int,
        dtype,
        backward: bool,
        flops: int | None = None,  # noqa: ANN001
    ) -> None:
        """Records the products of B samples' (Lq, Lk) heads as (B*H) bmm's; their FLOPs, or
        `flops` per product pair (S, O: 2 H d sum(Lq Lk)) when the shapes stand in for others."""
        if B * Lq * Lk == 0:
            return
        # (m, k, n) of each product, (BH, m, k) x (BH, k, n): S, O; or dP, dV, dQ, dK
        forward = [(Lq, d, Lk), (Lq, Lk, d)]
        for m, kk, n in (
            [(Lq, d, Lk), (Lk, Lq, d), (Lq, Lk, d), (Lk, Lq, d)] if backward else forward
        ):
            a = TensorSpec(((B * H, m, kk), (m * kk, kk, 1), dtype))
            b = TensorSpec(((B * H, kk, n), (kk * n, n, 1), dtype))
            self.calls[(aten.bmm.default, (a, b), ())] += 1
            self.flops += 2 * B * H * m * kk * n if flops is None else flops

    def _count_ragged(self, q, q_offsets, k_offsets, backward: bool) -> None:  # noqa: ANN001
        """The ragged kernel's products: their exact FLOPs (each sample's (Lq_b, Lk_b) heads),
        replayed as ONE bmm per product over the samples with keys at a FLOP-equivalent shape
        (Lq = their mean query count, Lk such that B Lq Lk = sum Lq_b Lk_b): the products as
        batched as they could be. One bmm per distinct length pair would be the literal shapes,
        but replaying hundreds of tiny bmm's measures call overhead, not the GEMM rate, and
        would lower the ceiling (ATRank (256, 20): 4.9 against 2.8 ms of attention products a
        step)."""
        _, H, d = q.shape
        lq, lk = q_offsets.diff(), k_offsets.diff()
        live = (lq * lk) > 0
        B = int(live.sum())
        if B == 0:
            return
        pairs = int((lq * lk).sum())  # sum Lq_b Lk_b
        Lq = max(1, round(int(lq[live].sum()) / B))
        Lk = max(1, round(pairs / (B * Lq)))
        self._count(B, Lq, Lk, H, d, q.dtype, backward, flops=2 * H * d * pairs)

    def forward(self, q, k, *args):  # noqa: ANN001, ANN002, ANN201
        B, Lq, H, d = q.shape
        self._count(B, Lq, k.shape[1], H, d, q.dtype, backward=False)
        return self.ext.forward(q, k, *args)

    def backward(self, grad, q, k, *args):  # noqa: ANN001, ANN002, ANN201
        B, Lq, H, d = q.shape
        self._count(B, Lq, k.shape[1], H, d, q.dtype, backward=True)
        return self.ext.backward(grad, q, k, *args)

    def forward_ragged(self, q, k, v, q_offsets, k_offsets, *args):  # noqa: ANN001, ANN002, ANN201
        self._count_ragged(q, q_offsets, k_offsets, backward=False)
        return self.ext.forward_ragged(q, k, v, q_offsets, k_offsets, *args)

    def backward_ragged(self, grad, q, k, v, q_offsets, k_offsets, *args):  # noqa: ANN001, ANN002, ANN201
        self._count_ragged(q, q_offsets, k_offsets, backward=True)
        return self.ext.backward_ragged(grad, q, k, v, q_offsets, k_offsets, *args)


def record_steps(step, n: int) -> tuple[float, Counter]:  # noqa: ANN001
    """FLOPs and matrix-product calls of `n` calls of `step` (whole training steps), summed;
    the fused attention kernel's products included (`RecordFusedAttention`)."""
    from seqrank import kernels

    rec = RecordMatmuls()
    ext = kernels.load("attention") if DEVICE.type == "cpu" else None
    fused = None if ext is None else RecordFusedAttention(ext)
    try:
        if fused is not None:
            kernels._state["attention"] = fused
        with FlopCounterMode(display=False, custom_mapping=FLOPS_IN_PLACE) as fc, rec:
            for _ in range(n):
                step()
    finally:
        if fused is not None:
            kernels._state["attention"] = ext
    if fused is None:
        return fc.get_total_flops(), rec.calls
    return fc.get_total_flops() + fused.flops, rec.calls + fused.calls


def record_step(step) -> tuple[float, Counter]:  # noqa: ANN001
    """FLOPs and matrix-product calls of one call of `step` (a whole training step)."""
    return record_steps(step, 1)


def bench(
    model: str,
    B: int,
    hist: int,
    dm: SeqDataModule,
    steps: int,
    precision: str,
    embeddings: str = "auto",
    compile: bool = False,
    n_batches: int = 8,
    length_groups: int | None = None,
) -> dict:
    schema = dm.schema
    dm.batch_size, dm.max_len = B, hist
    dm.device_store = str(DEVICE) if DEVICE_STORE else False
    with train_split(dm, train_samples(dm, hist)):
        loader = dm.train_dataloader()
    it = iter(loader)
    batches = [next(it).to(DEVICE) for _ in range(n_batches)]
    # compute only: our model, fused Adam (its sparse-gradient update for row gradients),
    # pre-built batches
    sparse = {"auto": "auto", "dense": False}.get(embeddings, True)
    lazy = embeddings == "lazy"
    torch.manual_seed(0)
    net = build_net(model, schema, hist, sparse, length_groups).to(DEVICE)
    opt = Adam(net.parameters(), 1e-3, fused=True, lazy=lazy)
    dense_why = resolve_sparse_embeddings(net, opt)  # "auto": as RankingModule decides it
    k = [0]

    def step() -> None:
        b = batches[k[0] % len(batches)]
        k[0] += 1
        with autocast(precision):
            loss = F.binary_cross_entropy_with_logits(net(b).float(), b.label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def cycle() -> None:  # each pre-built batch once
        for _ in batches:
            step()

    cycle()  # warm-up: every batch's shapes
    flops, calls = record_steps(step, n_batches)  # one step on each batch
    ceiling = Ceiling(calls, steps=n_batches)
    # the plain reference, one step at a time on the same batches
    ref_step = reference_step(model, schema, hist, batches, precision)

    def ref_cycle() -> None:
        for _ in batches:
            ref_step()

    # compute and reference cycles in turns, a ceiling pass after each: fastest of each
    t_compute, t_ref_best = (t / n_batches for t in interleaved([cycle, ref_cycle], ceiling, steps))
    t_ceiling_best = ceiling.seconds()  # fastest pass of these rounds, not of the e2e windows
    t_gather = timed(lambda: next(it), steps, stat=np.mean)
    # end to end through Lightning
    module = RankingModule(
        build_net(model, schema, hist, sparse, length_groups),
        compile=compile,
        optimizer=lambda params: Adam(params, 1e-3, fused=True, lazy=lazy),
    )
    trainer = L.Trainer(
        max_steps=3 + steps + 1,  # warm-up, timed, one to end the last timed
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator=DEVICE.type,
        devices=1,
        precision=precision,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
    )
    # after every e2e step: a ceiling pass and a reference step, timed, their time taken out
    timer = _StepTimer(warmup=3, ceiling=ceiling, reference=ref_step)
    trainer.callbacks.append(timer)
    trainer.fit(module, train_dataloaders=loader)
    t_e2e = timer.per_step(np.mean)
    # the same windows as the e2e steps: means over the passes and reference steps between them
    t_ref = float(np.mean(timer.references))
    t_gemm = float(np.mean(timer.passes)) / n_batches
    label = (
        model
        + (f" {embeddings}" if embeddings != "auto" else "")
        + (f" lg{length_groups}" if length_groups is not None else "")
    )
    return {
        "model": label + (" compiled" if compile else ""),
        "batch": B,
        "hist": hist,
        "e2e": B / t_e2e,
        "e2e median": B / timer.per_step(np.median),
        "e2e best": B / timer.per_step(np.min),
        "compute": B / t_compute,
        "reference": B / t_ref,
        "ceiling": B / t_gemm,
        "reference best": B / t_ref_best,
        "windows": len(timer.references),  # e2e steps with a reference step and a pass after
        "ceiling best": B / t_ceiling_best,
        "gflops": flops / n_batches / t_gemm / 1e9,
        "mflop/sample": flops / n_batches / B / 1e6,
        "input_share": t_gather / t_e2e,
        "embedding gradients": "dense" if embeddings == "dense" or dense_why else "rows",
    }


def reference_step(model: str, schema, hist: int, batches: list, precision: str):  # noqa: ANN001, ANN201
    """A function running one training step of the plain reference of `model`, dense Adam, on
    the next of `batches` (cycling through them)."""
    torch.manual_seed(0)
    if model == "bst":
        ref = PlainBST(schema.num_items, schema.num_cates, hist).to(DEVICE)
    else:
        ref = PlainATRank(schema.num_items, schema.num_cates).to(DEVICE)
    inputs = []
    for b in batches:
        if model == "bst":
            pad = ~torch.cat(
                [b.hist_mask, torch.ones(len(b), 1, dtype=torch.bool, device=DEVICE)], 1
            )
            bucket = log2_time_bucket(F.pad(b.hist_gap, (0, 1)), 12)  # the target's gap is 0
            inputs.append((b.hist_item, b.hist_cate, b.target_item, b.target_cate, bucket, pad))
        else:
            bucket = log2_time_bucket(b.hist_gap, 12)
            inputs.append(
                (b.hist_item, b.hist_cate, bucket, b.hist_mask, b.target_item, b.target_cate)
            )
    opt = torch.optim.Adam(ref.parameters(), 1e-3)
    k = [0]

    def step() -> None:
        b, x = batches[k[0] % len(batches)], inputs[k[0] % len(batches)]
        k[0] += 1
        with autocast(precision):
            logits = ref(*x).float()
        loss = F.binary_cross_entropy_with_logits(logits, b.label)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


class _StepTimer(L.Callback):
    """Time from one batch start to the next: fetching the batch, the step and all hooks. After
    each timed step a ceiling pass and one step of the plain reference run, their time taken
    out and recorded (`passes`: the passes' ceiling times; `references`: the reference steps'
    seconds), so that e2e, ceiling and reference are measured in the same stretches of time."""

    def __init__(self, warmup: int, ceiling: Ceiling, reference=None) -> None:  # noqa: ANN001
        self.warmup, self.ceiling, self.reference = warmup, ceiling, reference
        self.starts, self.excluded, self.passes, self.references = [], [], [], []

    def on_train_batch_start(self, *args) -> None:  # noqa: ANN002
        sync()
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, *args) -> None:  # noqa: ANN002
        sync()
        if len(self.starts) <= self.warmup:
            self.excluded.append(0.0)
            return
        t0 = time.perf_counter()
        self.ceiling.sample()
        self.passes.append(self.ceiling.last)
        if self.reference is not None:
            self.references.append(timed(self.reference, 1, warmup=0))
        self.excluded.append(time.perf_counter() - t0)

    def per_step(self, stat=np.mean) -> float:  # noqa: ANN001
        steps = np.diff(self.starts) - np.asarray(self.excluded[: len(self.starts) - 1])
        return float(stat(steps[self.warmup :]))


def attention_path() -> str:
    """Which attention implementation the models' steps run (for the table's title)."""
    if DEVICE.type == "cuda":
        return "scaled_dot_product_attention"
    from seqrank import kernels

    if kernels.load("attention") is not None:
        return "fused C++ kernel"
    return "Python kernels" + (
        "" if kernels.enabled("attention") else " (SEQRANK_FUSED_ATTENTION=0)"
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=["bst", "atrank"])
    p.add_argument("--batch", nargs="+", type=int, default=[256, 1024])
    p.add_argument("--hist", nargs="+", type=int, default=[20, 50])
    p.add_argument(
        "--steps", type=int, default=10, help="timed cycles (compute, reference) and e2e steps"
    )
    p.add_argument(
        "--batches", type=int, default=8, help="pre-built batches: a cycle, and the ceiling's steps"
    )
    p.add_argument(
        "--lengths",
        choices=LENGTHS,
        default="electronics",
        help="events per user of the random store (RandomElectronics)",
    )
    p.add_argument(
        "--length-groups",
        type=int,
        default=None,
        help="the models' length_groups (0: pad to --hist); default: the models' default",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--precision", default="32", help="32 | bf16-mixed | 16-mixed (Lightning's names)"
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--embeddings",
        nargs="+",
        choices=["auto", "dense", "sparse", "lazy"],
        default=["auto"],
        help="embedding gradients: auto (the configs' default: sparse rows with dense Adam's "
        "update on one CPU process, else dense); dense; sparse rows with dense Adam's update; "
        "sparse rows with lazy Adam",
    )
    p.add_argument("--compile", action="store_true", help="e2e with RankingModule(compile=True)")
    p.add_argument(
        "--store",
        choices=["host", "device"],
        default=None,
        help="where batches are gathered (data.device_store); default: device on cuda, host on cpu",
    )
    p.add_argument("--work-dir", default="data/bench")
    a = p.parse_args()
    global DEVICE, DEVICE_STORE
    DEVICE = torch.device(a.device)
    DEVICE_STORE = (a.store or ("device" if a.device == "cuda" else "host")) == "device"
    if a.threads:
        torch.set_num_threads(a.threads)
    source = RandomElectronics(lengths=a.lengths, hist=max(a.hist))
    dm = SeqDataModule(
        source, name="random_electronics", processed_dir=Path(a.work_dir) / "processed"
    )
    dm.prepare_data()
    dm.setup()
    lines = []
    for h in a.hist:
        samples = train_samples(dm, h)
        mean, full = history_lengths(samples, h)
        lines.append(
            f"hist {h}: {len(samples):,} samples, mean {mean:.1f} ({1 - mean / h:.0%} of a padded batch "
            f"is padding), {full:.0%} full"
        )
    console = rich.console.Console(width=220)  # every column of the table, also when piped
    console.print(f"training histories ({a.lengths} lengths): " + "; ".join(lines))
    rows = [
        bench(m, B, h, dm, a.steps, a.precision, e, a.compile, a.batches, a.length_groups)
        for m in a.models
        for e in a.embeddings
        for B in a.batch
        for h in a.hist
    ]
    where = (
        torch.cuda.get_device_name()
        if DEVICE.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    store = "on the device" if DEVICE_STORE else "on the host"
    t = Table(
        title=f"training samples/s — {where}, precision {a.precision}, {a.lengths} history lengths, "
        f"batches gathered {store}, attention: {attention_path()}"
    )
    for c in (
        "model",
        "batch",
        "hist",
        "e2e",
        "e2e median",
        "e2e best",
        "compute",
        "reference",
        "ceiling",
        "e2e/ceiling",
        "e2e/ref",
        "ceiling/ref",
        "compute/ceiling",
        "compute/ref",
        "input share",
        "GFLOP/s",
        "MFLOP/sample",
    ):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(
            r["model"],
            str(r["batch"]),
            str(r["hist"]),
            f"{r['e2e']:.0f}",
            f"{r['e2e median']:.0f}",
            f"{r['e2e best']:.0f}",
            f"{r['compute']:.0f}",
            f"{r['reference']:.0f}",
            f"{r['ceiling']:.0f}",
            f"{r['e2e'] / r['ceiling']:.0%}",
            f"{r['e2e'] / r['reference']:.2f}x",
            f"{r['ceiling'] / r['reference']:.2f}x",
            f"{r['compute'] / r['ceiling best']:.0%}",
            f"{r['compute'] / r['reference best']:.2f}x",
            f"{r['input_share']:.1%}",
            f"{r['gflops']:.0f}",
            f"{r['mflop/sample']:.1f}",
        )
    console.print(t)
    grads = {r["model"]: r["embedding gradients"] for r in rows}
    console.print("embedding gradients: " + "; ".join(f"{m}: {g}" for m, g in grads.items()))


if __name__ == "__main__":
    main()
