"""Adam for models whose large embedding tables produce sparse (row-wise) gradients.

A lookup touches B * (L+1) rows of a table with ~10^5 rows (Electronics: 5k of 63k rows at
B=256). With a dense gradient every step zero-fills the whole table's gradient (a 16 MB memset
for Electronics' items), adds the lookups into it and runs Adam over every row, reading the
gradient once more. With `nn.Embedding(sparse=True)` the
gradient holds only the touched rows, and `Adam` below updates the table either

- exactly as dense Adam would (the default, `lazy=False`): one pass over every row of the table
  and its moments, the touched rows adding their gradient, the others a zero that is never
  stored (`csrc/adam.cpp`; without the kernel, the gradient is densified and torch's Adam runs).
  The same updates as a dense gradient, up to float rounding (a row looked up twice sums its
  gradients in another order); or
- lazily (`lazy=True`): only the touched rows ("lazy" Adam, as TensorFlow's LazyAdam and
  `torch.optim.SparseAdam`), cheaper again but not dense Adam.

Lazy Adam is not dense Adam. Dense Adam moves an untouched row too: its moments decay
(m <- beta1 m, v <- beta2 v) and the row keeps moving along m / sqrt(v). Lazy Adam leaves
untouched rows, moments included, as they are. Both agree exactly on the first update (all
moments are zero) and whenever every row with non-zero moments is in the batch; rows of rare
items differ. `torch.optim.SparseAdam` additionally applies eps before the bias correction of
v; here the touched rows follow `torch.optim.Adam`'s formula exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.optim.adam import adam as adam_functional

from seqrank import kernels

log = logging.getLogger(__name__)

# a net's `sparse_embeddings`: dense gradients, row gradients, or row gradients where they are
# the same updates and faster (`resolve_sparse_embeddings`)
SPARSE_EMBEDDINGS = (False, True, "auto")


class Adam(torch.optim.Adam):
    """`torch.optim.Adam` that also accepts sparse gradients: dense Adam from them by default,
    or lazy Adam on their rows.

    Dense gradients go through torch's Adam (fused or foreach as configured). Each sparse
    gradient (from `nn.Embedding(sparse=True)`) gets, by default, the dense Adam step of the
    whole parameter (every row, untouched rows with a zero gradient) in one pass of the C++
    kernel (`seqrank.kernels`, CPU float32/float64; elsewhere the gradient is densified for
    torch's Adam). With `lazy=True` it gets a row-wise ("lazy") Adam step instead: its rows of
    the parameter and of the moments are gathered, updated by the same torch Adam kernel and
    scattered back, so the first step equals dense Adam's exactly. The state is
    `torch.optim.Adam`'s (`step`, `exp_avg`, `exp_avg_sq` per parameter), so checkpoints move
    between the two.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        betas: (beta1, beta2).
        eps: added to sqrt(v_hat).
        weight_decay: L2 penalty added to the gradient; for a sparse gradient, only its rows.
        foreach: as in `torch.optim.Adam` (dense parameters).
        maximize: maximise instead of minimise.
        fused: as in `torch.optim.Adam` (dense parameters).
        decoupled_weight_decay: AdamW-style decay (lazy: only the touched rows of a sparse
            gradient decay).
        lazy: sparse gradients update only their rows (lazy Adam) instead of the whole
            parameter as dense Adam would.

    Raises:
        ValueError: for `amsgrad` (not supported) and for what `torch.optim.Adam` rejects.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        lazy: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            foreach=foreach,
            maximize=maximize,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        self.defaults["lazy"] = lazy  # also for groups added later (add_param_group)
        for group in self.param_groups:
            group.setdefault("lazy", lazy)
        # AMP's GradScaler must unscale the gradients itself (our sparse path takes no scale)
        self._step_supports_amp_scaling = False

    def _state(self, p: Tensor, fused: bool) -> dict:
        state = self.state[p]
        if len(state) == 0:
            device = p.device if fused else None
            state["step"] = torch.zeros((), dtype=torch.float32, device=device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def __setstate__(self, state: dict) -> None:
        # also what load_state_dict ends with: a group saved before `lazy` existed gets ours
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("lazy", self.defaults.get("lazy", False))

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One Adam step: dense gradients over whole tensors; sparse ones as dense Adam over
        the whole tensor (default) or over their rows (`lazy`)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["amsgrad"]:
                raise ValueError("seqrank.optim.Adam: amsgrad is not supported")
            with_grad = [p for p in group["params"] if p.grad is not None]
            dense = [p for p in with_grad if not p.grad.is_sparse]
            sparse = [p for p in with_grad if p.grad.is_sparse]
            if sparse and not group["lazy"]:
                kernel = kernels.load("adam")
                fast = [p for p in sparse if kernel is not None and _kernel_takes(p)]
                # no kernel for these: the dense gradient, in the same torch step as the others
                dense += [p for p in sparse if not any(p is f for f in fast)]
                sparse = fast
            if dense:
                self._dense_step(group, dense)
            if sparse and group["lazy"]:
                self._rowwise_step(group, sparse)
            elif sparse:
                self._sparse_dense_step(group, sparse, kernel)
        return loss

    def _dense_step(self, group: dict, params: list[Tensor]) -> None:
        fused = bool(group["fused"])
        states = [self._state(p, fused) for p in params]
        self._dense_step_on(
            group,
            params,
            [p.grad.to_dense() if p.grad.is_sparse else p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states],
        )

    @staticmethod
    def _dense_step_on(
        group: dict,
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        steps: list[Tensor],
    ) -> None:
        beta1, beta2 = group["betas"]
        adam_functional(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            foreach=group["foreach"],
            fused=group["fused"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
        )

    def _sparse_dense_step(self, group: dict, params: list[Tensor], kernel) -> None:  # noqa: ANN001
        """Dense Adam over each whole parameter from its sparse gradient, by the C++ kernel."""
        beta1, beta2 = group["betas"]
        for p in params:
            # the lookups' rows as the backward gives them: the kernel sums repeats itself
            # (coalescing, a sort of the rows, cost more than the kernel's pass over the table)
            rows, values = p.grad._indices()[0].contiguous(), p.grad._values().contiguous()
            state = self._state(p, bool(group["fused"]))
            state["step"] += 1
            kernel.sparse_dense_adam(
                p.data,
                state["exp_avg"],
                state["exp_avg_sq"],
                rows,
                values.view(len(values), -1),
                float(group["lr"]),
                float(beta1),
                float(beta2),
                float(group["eps"]),
                float(group["weight_decay"]),
                bool(group["decoupled_weight_decay"]),
                bool(group["maximize"]),
                float(state["step"]),
            )

    def _rowwise_step(self, group: dict, params: list[Tensor]) -> None:
        fused = bool(group["fused"])
        rows, gathered = [], []
        for p in params:
            grad = p.grad.coalesce()  # duplicate rows summed, as in a dense gradient
            state = self._state(p, fused)
            r = grad.indices()[0]  # (R,)
            # the touched rows of the parameter and of its moments: (R, D) each
            gathered.append(
                [t.index_select(0, r) for t in (p, state["exp_avg"], state["exp_avg_sq"])]
                + [grad.values(), state["step"]]
            )
            rows.append(r)
        # torch's (fused) Adam kernel on the gathered rows, then scatter them back
        w, m, v, g, steps = (list(c) for c in zip(*gathered, strict=True))
        self._dense_step_on(group, w, g, m, v, steps)
        for p, r, wr, mr, vr in zip(params, rows, w, m, v, strict=True):
            state = self.state[p]
            p.index_copy_(0, r, wr)
            state["exp_avg"].index_copy_(0, r, mr)
            state["exp_avg_sq"].index_copy_(0, r, vr)


def _kernel_takes(p: Tensor) -> bool:
    """Whether the sparse-gradient Adam kernel can update `p` in place (CPU, float32/64,
    contiguous parameter and moments, gradient sparse along the first axis only)."""
    return (
        p.device.type == "cpu"
        and p.dtype in (torch.float32, torch.float64)
        and p.is_contiguous()
        and p.dim() >= 1
        and p.grad.sparse_dim() == 1
        and p.grad.dtype == p.dtype
    )


def has_sparse_grads(params: Iterable[Tensor]) -> bool:
    """Whether any parameter currently holds a sparse gradient."""
    return any(p.grad is not None and p.grad.is_sparse for p in params)


@torch.no_grad()
def clip_gradients_(
    params: Iterable[Tensor], clip_val: float, algorithm: str = "norm"
) -> Tensor | None:
    """Clip dense and sparse gradients together (torch's clip functions refuse sparse ones).

    Sparse gradients are coalesced in place first, so that a row looked up twice counts once
    with its summed gradient, as in the dense gradient.

    Args:
        params: parameters whose `.grad` to clip.
        clip_val: max total 2-norm (`norm`) or max absolute value (`value`).
        algorithm: `norm` or `value`.

    Returns:
        the total norm before clipping for `norm`, None for `value`.

    Raises:
        ValueError: for another algorithm.
    """
    params = [p for p in params if p.grad is not None]
    for p in params:
        if p.grad.is_sparse and not p.grad.is_coalesced():
            p.grad = p.grad.coalesce()
    values = [p.grad._values() if p.grad.is_sparse else p.grad for p in params]
    if algorithm == "value":
        for v in values:
            v.clamp_(-clip_val, clip_val)
        return None
    if algorithm != "norm":
        raise ValueError(f"gradient_clip_algorithm={algorithm!r} must be 'norm' or 'value'")
    if not values:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in values]))
    scale = (clip_val / (total + 1e-6)).clamp(max=1.0)  # torch's clip_grad_norm_ formula
    for v in values:
        v.mul_(scale.to(v.dtype))
    return total


def sparse_embeddings(module: nn.Module) -> list[nn.Embedding]:
    """The `nn.Embedding`s of `module` that produce sparse gradients."""
    return [m for m in module.modules() if isinstance(m, nn.Embedding) and m.sparse]


def check_sparse_embeddings(value: object, owner: str) -> bool | str:
    """`value` if it is a valid `sparse_embeddings` setting of `owner` (a model's name).

    Raises:
        ValueError: naming the key, its value and what is allowed.
    """
    if isinstance(value, bool) or value == "auto":
        return value
    raise ValueError(
        f"{owner}: sparse_embeddings={value!r} is invalid; allowed: true, false or 'auto'"
    )


def embedding_table(
    num: int, dim: int, sparse: bool | str, padding_idx: int | None = None
) -> nn.Embedding:
    """An id table for a net's `sparse_embeddings` setting: `True` gives row gradients, `False`
    dense ones, "auto" dense ones until `resolve_sparse_embeddings` decides (the table is marked
    for it)."""
    table = nn.Embedding(num, dim, padding_idx=padding_idx, sparse=sparse is True)
    table.sparse_auto = sparse == "auto"
    return table


def resolve_sparse_embeddings(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    world_size: int = 1,
    compiled: bool = False,
    scaled: bool = False,
) -> str | None:
    """Decide the gradients of `module`'s "auto" tables (`embedding_table`) for this run: row
    (sparse) gradients where the optimiser's update from them is dense Adam's and our kernel
    runs it, dense ones elsewhere.

    Row gradients need `seqrank.optim.Adam` with `lazy=False` (same updates as the dense
    gradient, up to the order in which a repeated row's gradients are summed), the C++ kernel,
    tables on the CPU in float32/64, one process (DDP would all-reduce sparse tensors), no
    `torch.compile` and no gradient scaler. Measured on a 2-core CPU, in-process A/B of whole
    steps (docs/performance.md, "Dense Adam from row gradients"): 0.72-1.00x the dense step's
    time for ATRank and 0.95-0.98x for BST at batch 32-1024, history 20-50.

    Args:
        module: the net; its tables marked "auto" are switched (others are left alone).
        optimizer: the optimiser that will step them.
        world_size: processes training together.
        compiled: the net runs under `torch.compile`.
        scaled: a gradient scaler (16-mixed) unscales the gradients.

    Returns:
        None when the tables now give row gradients (or there are none to decide), else why
        they stay dense.
    """
    tables = [m for m in module.modules() if getattr(m, "sparse_auto", False)]
    if not tables:
        return None
    groups = getattr(optimizer, "param_groups", [])
    reason = None
    if not isinstance(optimizer, Adam):
        reason = f"the optimiser is {type(optimizer).__name__}, not seqrank.optim.Adam"
    elif any(g.get("lazy") for g in groups):
        reason = "optimizer.lazy=true asks for lazy Adam, which is not dense Adam"
    elif any(t.weight.device.type != "cpu" for t in tables):
        reason = "the tables are not on the CPU (the update kernel is CPU-only)"
    elif any(t.weight.dtype not in (torch.float32, torch.float64) for t in tables):
        reason = "the tables are neither float32 nor float64"
    elif world_size > 1:
        reason = f"{world_size} processes train together (DDP)"
    elif compiled:
        reason = "the net is compiled"
    elif scaled:
        reason = "a gradient scaler (16-mixed) unscales the gradients"
    elif kernels.load("adam") is None:
        reason = "the Adam kernel is not available"
    for t in tables:
        t.sparse = reason is None
    if reason is None:
        log.info("sparse_embeddings=auto: %d tables give row gradients", len(tables))
    else:
        log.info("sparse_embeddings=auto: dense gradients, since %s", reason)
    return reason
