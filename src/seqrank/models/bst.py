"""Behavior Sequence Transformer (Chen et al., 2019, arXiv:1905.06874).

The target item joins the user's behaviour sequence; a Transformer lets every event attend to
every other and to the target; the time gap to the target is the position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqrank.data.types import Batch, Schema
from seqrank.models.layers import MLP, TimeBucketEmbedding, TransformerEncoder
from seqrank.models.layers.attention import ragged_kernel
from seqrank.models.layers.ragged import (
    batch_groups,
    inverse_permutation,
    real_positions,
    right_aligned_linear,
    sequence_offsets,
)
from seqrank.optim import check_sparse_embeddings, embedding_table

POOLINGS = ("concat", "target", "mean")
# what running one more length group costs, in tokens (a token: ~1.4 MFLOP of a training step at
# paper settings; a group: ~150 more op calls forward and backward, ~2 ms on a 2-core CPU)
GROUP_COST_TOKENS = 256


class BST(nn.Module):
    """Behavior Sequence Transformer for click-through ranking.

    Items are embedded as [item; category] (the DIN/ATRank convention), so the Transformer
    width is d_model = 2 * embed_dim.

    Args:
        schema: dataset schema; sizes every vocabulary.
        embed_dim: width of the item and of the category embedding (d_model = 2 * embed_dim).
        num_heads: attention heads; must divide d_model.
        num_layers: Transformer blocks (the paper finds 1 best).
        ffn_dim: FFN hidden width; None = d_model.
        dropout: dropout inside the Transformer.
        max_len: longest history used; longer histories keep their most recent max_len events.
        time_buckets: log2 buckets of the time gap to the target (the position embedding).
        time_unit_seconds: unit of the log2 buckets (a day by default).
        pooling: how the L+1 Transformer outputs become one vector: `concat` (the paper:
            flatten all of them, left-padded to max_len+1), `target` (the target's output) or
            `mean` (mean over valid positions and the target).
        use_user: concatenate a user embedding ("other features") before the MLP.
        use_behavior: add a behaviour-type embedding when the schema has several behaviours
            (num_behaviors > 2); the target gets an extra "candidate" id.
        mlp_dims: hidden widths of the final MLP (LeakyReLU).
        mlp_dropout: dropout after each MLP hidden layer.
        init_std: standard deviation of the item and category embedding initialisation (the
            paper gives none; 0.1 learns faster than 0.02 on the synthetic data; other tables
            start at 0.02).
        sparse_embeddings: True: the item, category and user tables produce sparse gradients
            holding only the rows in the batch (`nn.Embedding(sparse=True)`); train with
            `seqrank.optim.Adam`, which then runs dense Adam's update without a dense gradient
            (or, with `lazy=True`, updates only those rows). False: dense gradients. "auto":
            dense until `RankingModule` resolves it for the run (`optim.resolve_sparse_embeddings`:
            sparse where the updates are dense Adam's and faster, i.e. seqrank's Adam, CPU, one
            process).
        length_groups: run each batch as up to this many groups of similar history length,
            each cut to its own longest history, so padding costs no FLOPs (the same outputs
            and gradients; see `layers.ragged`); 0 = pad every batch to max_len.

    Raises:
        ValueError: for a hyperparameter out of range or heads not dividing d_model.
    """

    def __init__(
        self,
        schema: Schema,
        *,
        embed_dim: int = 64,
        num_heads: int = 8,
        num_layers: int = 1,
        ffn_dim: int | None = None,
        dropout: float = 0.2,
        max_len: int = 20,
        time_buckets: int = 12,
        time_unit_seconds: float = 86400.0,
        pooling: str = "concat",
        use_user: bool = False,
        use_behavior: bool = True,
        mlp_dims: tuple[int, ...] = (1024, 512, 256),
        mlp_dropout: float = 0.0,
        init_std: float = 0.1,
        sparse_embeddings: bool | str = "auto",
        length_groups: int = 4,
    ) -> None:
        super().__init__()
        d_model = 2 * embed_dim
        _check(embed_dim >= 1, f"embed_dim must be >= 1, got embed_dim={embed_dim}")
        _check(
            num_heads >= 1 and d_model % num_heads == 0,
            f"num_heads={num_heads} must divide the attention width d_model={d_model} "
            f"(= 2 * embed_dim={embed_dim})",
        )
        _check(num_layers >= 0, f"num_layers must be >= 0, got num_layers={num_layers}")
        _check(max_len >= 1, f"max_len must be >= 1, got max_len={max_len}")
        _check(time_buckets >= 1, f"time_buckets must be >= 1, got time_buckets={time_buckets}")
        _check(0.0 <= dropout < 1.0, f"dropout must be in [0, 1), got dropout={dropout}")
        _check(
            0.0 <= mlp_dropout < 1.0,
            f"mlp_dropout must be in [0, 1), got mlp_dropout={mlp_dropout}",
        )
        _check(pooling in POOLINGS, f"pooling={pooling!r} must be one of {POOLINGS}")
        _check(length_groups >= 0, f"length_groups must be >= 0, got length_groups={length_groups}")
        ffn_dim = d_model if ffn_dim is None else ffn_dim
        _check(ffn_dim >= 1, f"ffn_dim must be >= 1, got ffn_dim={ffn_dim}")
        self.d_model = d_model
        self.max_len = max_len
        self.pooling = pooling
        self.length_groups = length_groups
        self.group_cost = GROUP_COST_TOKENS
        self.num_behaviors = schema.num_behaviors

        # embedding layer (paper section 2.1): item and category, concatenated
        # sparse: the backward pass touches only the looked-up rows, not the 63k x 64 table
        sparse = check_sparse_embeddings(sparse_embeddings, "BST")
        self.item_emb = embedding_table(schema.num_items, embed_dim, sparse, padding_idx=0)
        self.cate_emb = embedding_table(schema.num_cates, embed_dim, sparse, padding_idx=0)
        # position: pos(v_i) = t(v_t) - t(v_i), in log2 buckets
        self.time_emb = TimeBucketEmbedding(time_buckets, d_model, time_unit_seconds)
        # one behaviour kind (Amazon) carries no information; the extra row is the candidate
        self.behavior_emb = (
            nn.Embedding(schema.num_behaviors + 1, d_model, padding_idx=0)
            if use_behavior and schema.num_behaviors > 2
            else None
        )
        self.user_emb = (
            embedding_table(schema.num_users, embed_dim, sparse, padding_idx=0)
            if use_user
            else None
        )

        # transformer layer (section 2.2): post-norm self-attention + LeakyReLU FFN
        self.encoder = TransformerEncoder(
            num_layers, d_model, num_heads, ffn_dim=ffn_dim, dropout=dropout
        )

        # MLP layers (section 2.3) on [pooled sequence; other features] -> one logit
        pooled_dim = (max_len + 1) * d_model if pooling == "concat" else d_model
        other_dim = embed_dim if use_user else 0
        self.mlp = MLP(pooled_dim + other_dim, tuple(mlp_dims), dropout=mlp_dropout)

        self.apply(self._init_weights)
        for table in (self.item_emb, self.cate_emb):  # the id embeddings learn faster from 0.1
            nn.init.normal_(table.weight, mean=0.0, std=init_std)
            with torch.no_grad():
                table.weight[0].zero_()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def forward(self, batch: Batch) -> Tensor:
        """Score each candidate against its user's behaviour sequence.

        Args:
            batch: a `Batch` with left-padded histories of any length L.

        Returns:
            (B,) logits (no sigmoid).
        """
        split = self.split(batch)
        if split is not None:
            return self.forward_groups(*split)
        x, mask = self.embed_sequence(batch)  # (B, L+1, D), (B, L+1)
        x = self.encoder(x, mask)  # (B, L+1, D), zeros where padded
        z = self.pool(x, mask)  # (B, P)
        if self.user_emb is not None:
            z = torch.cat([z, self.user_emb(batch.user)], dim=-1)  # (B, P + E)
        return self.mlp(z).squeeze(-1).float()  # (B,), float32 also under autocast

    def split(self, batch: Batch) -> tuple[list[tuple[Batch, int]], Tensor] | None:
        """The batch's length groups (`layers.ragged.batch_groups`), or None to run it whole."""
        if not self.length_groups or torch.compiler.is_compiling():  # compiled: static shapes
            return None
        return batch_groups(batch, self.max_len, self.length_groups, self.group_cost, extra=1)

    def forward_groups(self, groups: list[tuple[Batch, int]], order: Tensor) -> Tensor:
        """`forward` on length groups: one lookup per table and one encoder pass over the tokens
        of every group (only the attention runs per group, at the group's length), BST's
        flattened sequences of different lengths into the first MLP layer as right-aligned
        columns (the zeros of the padding skipped).

        Args:
            groups: [(group batch, history length)]; order: (B,) rows of the batch, group by
                group (`batch_groups`).

        Returns:
            (B,) logits in batch order.
        """
        tokens = [self.sequence_tokens(sub) for sub, _ in groups]  # (n, L+1) each
        masks = [t[4] for t in tokens]  # (n, L+1) each
        # a group's sequences are padded to its longest; every encoder layer but the attention
        # works on each token alone, so only the valid tokens go through them
        real = real_positions(masks)  # (R,) or None
        flat = [torch.cat([t[k].reshape(-1) for t in tokens]) for k in range(4)]  # (T,) each
        if real is not None:
            flat = [f[real] for f in flat]  # (R,) each
        # the encoder over the tokens of all groups at once (the attention over each
        # sequence's valid tokens with the CPU kernel, else per group)
        x = self.embed_tokens(*flat)  # (R or T, D)
        offsets = sequence_offsets(masks) if ragged_kernel(x) is not None else None
        out = self.encoder.forward_groups(x, masks, real, offsets)  # (T, D), 0 if padded
        zs = []
        parts = out.split([m.numel() for m in masks])  # (n * (L+1), D) each
        for x, mask, (sub, _) in zip(parts, masks, groups, strict=True):
            x = x.view(*mask.shape, -1)  # (n, L+1, D)
            z = x.flatten(1) if self.pooling == "concat" else self.pool(x, mask)  # (n, P_g)
            if self.user_emb is not None:
                z = torch.cat([z, self.user_emb(sub.user)], dim=-1)  # (n, P_g + E)
            zs.append(z)
        if self.pooling == "concat":  # P_g = (L+1) * D: the last columns of the padded input
            first, rest = self.mlp.net[0], self.mlp.net[1:]
            h = rest(right_aligned_linear(zs, first.weight, first.bias))  # (B, 1)
        else:
            h = self.mlp(torch.cat(zs))  # (B, 1)
        return h.squeeze(-1).float()[inverse_permutation(order)]  # (B,) in batch order

    def embed_items(self, item: Tensor, cate: Tensor) -> Tensor:
        """(...) item and category ids -> (..., D) embeddings [item; category]."""
        return torch.cat([self.item_emb(item), self.cate_emb(cate)], dim=-1)

    def sequence_tokens(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The ids of the sequence: history + target, and its mask.

        Args:
            batch: a `Batch` with histories of length L_in.

        Returns:
            (B, L+1) item, category, time gap and behaviour ids with the target at position L
            (gap 0, behaviour "candidate"), L = min(L_in, max_len), and the (B, L+1) bool mask
            of valid positions (the target is always valid).
        """
        L_in = batch.hist_item.shape[1]
        start = max(L_in - self.max_len, 0)  # left-padded: the last positions are the most recent
        padded = (
            batch.hist_item,
            batch.hist_cate,
            batch.hist_behavior,
            batch.hist_gap,
            batch.hist_mask,
        )
        item, cate, behavior, gap, mask = (t[:, start:] for t in padded)  # (B, L) each
        item = torch.cat([item, batch.target_item[:, None]], dim=1)  # (B, L+1)
        cate = torch.cat([cate, batch.target_cate[:, None]], dim=1)  # (B, L+1)
        # pos(v_i) = t(v_t) - t(v_i): the paper found this beats sin/cos positions; target: 0
        gap = F.pad(gap, (0, 1), value=0)  # (B, L+1)
        # the target is a candidate, not an observed behaviour: it gets its own id
        behavior = F.pad(behavior, (0, 1), value=self.num_behaviors)  # (B, L+1)
        target_valid = torch.ones(len(batch), 1, dtype=torch.bool, device=mask.device)  # (B, 1)
        return item, cate, gap, behavior, torch.cat([mask.bool(), target_valid], dim=1)

    def embed_tokens(self, item: Tensor, cate: Tensor, gap: Tensor, behavior: Tensor) -> Tensor:
        """(...) ids of `sequence_tokens` -> (..., D) embeddings, each plus its position."""
        x = self.embed_items(item, cate)  # (..., D)
        x = x + self.time_emb(gap)  # (..., D)
        if self.behavior_emb is not None:
            x = x + self.behavior_emb(behavior)
        return x

    def embed_sequence(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The paper's embedding layer: history + target, each plus its position.

        Args:
            batch: a `Batch` with histories of length L_in.

        Returns:
            (B, L+1, D) embeddings with the target at position L, L = min(L_in, max_len),
            and the (B, L+1) bool mask of valid positions (the target is always valid).
        """
        *ids, mask = self.sequence_tokens(batch)  # (B, L+1) each
        # one lookup per table for history and target: one backward pass over each table
        return self.embed_tokens(*ids), mask  # (B, L+1, D), (B, L+1)

    def pool(self, x: Tensor, mask: Tensor) -> Tensor:
        """Turn the Transformer outputs into one vector per sample.

        Args:
            x: (B, L+1, D) outputs, zero at padded positions, target last.
            mask: (B, L+1) bool valid positions.

        Returns:
            (B, (max_len+1) * D) for `concat`, else (B, D).
        """
        if self.pooling == "target":
            return x[:, -1]  # (B, D)
        if self.pooling == "mean":
            return x.sum(dim=1) / mask.sum(dim=1, keepdim=True).to(x.dtype)  # (B, D)
        # concat: left-pad to max_len+1 so the MLP input size does not depend on L
        if x.shape[1] < self.max_len + 1:  # (a pad of 0 would still copy)
            x = F.pad(x, (0, 0, self.max_len + 1 - x.shape[1], 0))  # (B, max_len+1, D)
        return x.flatten(1)  # (B, (max_len+1) * D)

    def attention_weights(self, batch: Batch) -> list[Tensor]:
        """Per-layer attention weights, for plots.

        Args:
            batch: a `Batch`.

        Returns:
            one (B, H, L+1, L+1) tensor per layer; the target is the last query/key.
        """
        x, mask = self.embed_sequence(batch)
        _, weights = self.encoder(x, mask, return_weights=True)
        return weights


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"BST: {message}")
