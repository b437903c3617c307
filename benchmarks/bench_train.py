"""Training throughput of BST and ATRank against this machine's FLOP-bound ceiling.

Prints, for each model and setting, samples/s of:
  e2e        our real path: SeqDataModule (store + vectorised gather) -> Lightning Trainer,
             timed from one batch start to the next (input, step and hooks)
  compute    our model's train step on pre-built batches (no input pipeline)
  reference  a plain-PyTorch BST (nn.TransformerEncoderLayer, dense Adam, pre-built tensors)
  ceiling    training FLOPs per sample (torch's FlopCounterMode) / GEMM rate measured now on
             the model's own matmul shapes, forward and both backward GEMMs of every Linear
             in the layouts autograd uses
and the ratios e2e/ceiling, e2e/reference and the input pipeline's share of the step.
`--embeddings dense sparse` runs each model both with dense embedding gradients and with
row-wise ones (`sparse_embeddings=True`, lazy Adam on the touched rows; BST only).
Data: a random store with Electronics shapes (63k items, 801 categories, 192k users).

    python benchmarks/bench_train.py --batch 256 1024 --hist 20 50 --models bst atrank \
        --embeddings dense sparse
    python benchmarks/bench_train.py --device cuda --precision bf16-mixed --batch 4096 16384   # GPU

`--device cuda` moves the model, the pre-built batches and the GEMM-rate probe to the GPU (timings
synchronise); `--precision bf16-mixed|16-mixed` runs every path under autocast and measures the
ceiling's GEMM rate in that dtype. The store stays in host memory (gathered on CPU, copied per
batch): a device-resident store is not built yet.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import lightning as L
import numpy as np
import polars as pl
import rich
import torch
import torch.nn.functional as F
from rich.table import Table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from seqrank.data.datamodule import SeqDataModule
from seqrank.lit.ranking import RankingModule
from seqrank.models.atrank import ATRank
from seqrank.models.bst import BST
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
    """What a straightforward PyTorch BST looks like (the field's baseline)."""

    def __init__(self, items: int, cates: int, hist: int, d: int = 64) -> None:
        super().__init__()
        self.item, self.cate = nn.Embedding(items, d), nn.Embedding(cates, d)
        self.pos = nn.Embedding(hist + 1, 2 * d)
        self.enc = nn.TransformerEncoderLayer(2 * d, 8, 2 * d, 0.2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear((hist + 1) * 2 * d, 1024), nn.LeakyReLU(), nn.Linear(1024, 512),
                                 nn.LeakyReLU(), nn.Linear(512, 256), nn.LeakyReLU(), nn.Linear(256, 1))

    def forward(self, hi, hc, ti, tc, pad):  # noqa: ANN001
        x = torch.cat([torch.cat([self.item(hi), self.cate(hc)], -1), torch.cat([self.item(ti), self.cate(tc)], -1)[:, None]], 1)
        x = x + self.pos.weight[None]
        x = self.enc(x, src_key_padding_mask=pad)
        return self.mlp(x.flatten(1)).squeeze(-1)


DEVICE = torch.device("cpu")


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


def timed(fn, steps: int, warmup: int = 3) -> float:  # noqa: ANN001
    for _ in range(warmup):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t) / steps


def gemm_rate(shapes: list[tuple[int, int, int]], dtype: torch.dtype) -> float:
    """FLOP/s of the GEMMs that training a Linear of each (m, k, n) shape runs, weighted by FLOPs.

    Per Linear y = x W^T (x: m x k, W: n x k): forward x @ W^T, input gradient dy @ W and weight
    gradient dy^T @ x, with the transposed views autograd passes to mm.
    """
    total_flops, total_t = 0.0, 0.0
    for m, k, n in shapes:
        x, w, dy = (torch.randn(*s, dtype=dtype, device=DEVICE) for s in ((m, k), (n, k), (m, n)))
        for a, b in ((x, w.t()), (dy, w), (dy.t(), x)):
            total_t += timed(lambda a=a, b=b: a @ b, steps=10)
            total_flops += 2 * m * k * n
    return total_flops / total_t


def matmul_shapes(net: nn.Module, batch) -> list[tuple[int, int, int]]:  # noqa: ANN001
    shapes = []

    def hook(mod, inp, out):  # noqa: ANN001
        x = inp[0]
        shapes.append((int(np.prod(x.shape[:-1])), mod.in_features, mod.out_features))

    hs = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        net(batch)
    for h in hs:
        h.remove()
    return shapes


def train_flops(net: nn.Module, batch) -> float:  # noqa: ANN001
    with FlopCounterMode(display=False) as fc:
        F.binary_cross_entropy_with_logits(net(batch), batch.label).backward()
    net.zero_grad(set_to_none=True)
    return fc.get_total_flops() / len(batch)


def bench(model: str, B: int, hist: int, dm: SeqDataModule, steps: int, precision: str,
          sparse: bool = False, compile: bool = False) -> dict:
    schema = dm.schema
    dm.batch_size, dm.max_len = B, hist
    loader = dm.train_dataloader()
    it = iter(loader)
    batches = [next(it).to(DEVICE) for _ in range(4)]
    torch.manual_seed(0)
    net = build_net(model, schema, hist).to(DEVICE)
    flops = train_flops(net, batches[0])
    shapes = matmul_shapes(net, batches[0])
    gemm_dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision.split("-")[0], torch.float32)
    rate = gemm_rate(shapes, gemm_dtype)
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

    t_compute = timed(step, steps)
    t_gather = timed(lambda: next(it), steps)
    # end to end through Lightning
    module = RankingModule(build_net(model, schema, hist, sparse), compile=compile,
                           optimizer=lambda params: Adam(params, 1e-3, fused=True))
    trainer = L.Trainer(max_steps=steps + 3, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator=DEVICE.type, devices=1,
                        precision=precision, use_distributed_sampler=False, num_sanity_val_steps=0)
    t0 = time.perf_counter()
    timer = _StepTimer(warmup=3)
    trainer.callbacks.append(timer)
    trainer.fit(module, train_dataloaders=loader)
    t_e2e = timer.per_step()
    # plain reference
    ref = PlainBST(schema.num_items, schema.num_cates, hist).to(DEVICE)
    ropt = torch.optim.Adam(ref.parameters(), 1e-3)
    rb = batches[0]
    pad = ~torch.cat([rb.hist_mask, torch.ones(B, 1, dtype=torch.bool, device=DEVICE)], 1)

    def rstep() -> None:
        with autocast(precision):
            logits = ref(rb.hist_item, rb.hist_cate, rb.target_item, rb.target_cate, pad).float()
        loss = F.binary_cross_entropy_with_logits(logits, rb.label)
        ropt.zero_grad()
        loss.backward()
        ropt.step()

    t_ref = timed(rstep, steps) if model == "bst" else float("nan")
    del t0
    return {
        "model": model + (" sparse" if sparse else "") + (" compiled" if compile else ""), "batch": B, "hist": hist, "e2e": B / t_e2e, "compute": B / t_compute,
        "reference": B / t_ref, "ceiling": rate / flops, "gflops": rate / 1e9, "mflop/sample": flops / 1e6,
        "input_share": t_gather / t_e2e,
    }


class _StepTimer(L.Callback):
    """Time from one batch start to the next: fetching the batch, the step and all hooks."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.starts = warmup, []

    def on_train_batch_start(self, *args) -> None:  # noqa: ANN002
        sync()
        self.starts.append(time.perf_counter())

    def per_step(self) -> float:
        return float(np.mean(np.diff(self.starts[self.warmup :])))


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
    p.add_argument("--work-dir", default="data/bench")
    a = p.parse_args()
    global DEVICE
    DEVICE = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    dm = SeqDataModule(RandomElectronics(), name="random_electronics", processed_dir=Path(a.work_dir) / "processed")
    dm.prepare_data()
    dm.setup()
    rows = [bench(m, B, h, dm, a.steps, a.precision, e == "sparse", a.compile)
            for m in a.models for e in a.embeddings for B in a.batch for h in a.hist
            if m == "bst" or e == "dense"]
    where = torch.cuda.get_device_name() if DEVICE.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    t = Table(title=f"training samples/s — {where}, precision {a.precision}")
    for c in ("model", "batch", "hist", "e2e", "compute", "reference", "ceiling", "e2e/ceiling", "e2e/ref", "input share", "GFLOP/s", "MFLOP/sample"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(r["model"], str(r["batch"]), str(r["hist"]), f"{r['e2e']:.0f}", f"{r['compute']:.0f}",
                  f"{r['reference']:.0f}", f"{r['ceiling']:.0f}", f"{r['e2e'] / r['ceiling']:.0%}",
                  f"{r['e2e'] / r['reference']:.2f}x", f"{r['input_share']:.1%}", f"{r['gflops']:.0f}",
                  f"{r['mflop/sample']:.1f}")
    rich.print(t)


if __name__ == "__main__":
    main()
