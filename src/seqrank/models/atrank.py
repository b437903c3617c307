"""ATRank (Zhou et al., AAAI 2018, arXiv:1711.06632).

Heterogeneous behaviours (a, o, t) are embedded per behaviour group, projected into one space,
related to each other by self-attention in K latent spaces (heads), and read out by a vanilla
attention from the target. Details follow the reference TensorFlow code (jinze1994/ATRank,
`atrank/model.py` for Amazon, `multi/model.py` for grouped behaviours).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqrank.data.types import Batch, Schema
from seqrank.models.layers.attention import (
    attention,
    attention_weights,
    cross_attention,
    ragged_cross_attention,
    ragged_kernel,
    ragged_self_attention,
    self_attention,
)
from seqrank.models.layers.dropout import dropout as apply_dropout
from seqrank.models.layers.ragged import (
    batch_groups,
    inverse_permutation,
    real_positions,
    sequence_offsets,
    to_positions,
    whole_batch,
)
from seqrank.models.layers.time import log2_time_bucket
from seqrank.optim import check_sparse_embeddings, embedding_table

TIME_MODES = ("concat", "add")
GROUP_BYS = ("item", "behavior")
# what running one more length group costs, in history positions (a position: ~0.27 MFLOP of a
# training step at paper settings, ~2 us on a 2-core CPU; a group: ~200 more op calls, ~3 ms)
GROUP_COST_TOKENS = 1024


def _glorot_(weight: Tensor, fan_in: int, fan_out: int) -> None:
    """TF's default initialiser (glorot uniform), with explicit fans so that a split kernel
    (a dense layer over a concatenation, stored as several tables) keeps the bound of the whole.
    """
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    nn.init.uniform_(weight, -bound, bound)


def _dense(in_dim: int, out_dim: int) -> nn.Linear:
    """A `tf.layers.dense`: glorot-uniform kernel, zero bias."""
    layer = nn.Linear(in_dim, out_dim)
    _glorot_(layer.weight, in_dim, out_dim)
    nn.init.zeros_(layer.bias)
    return layer


def _stacked(x: Tensor, *layers: nn.Linear) -> Tensor:
    """[layer(x) for layer in layers] concatenated on the last axis, as one matrix product."""
    weight = torch.cat([layer.weight for layer in layers])  # (sum of out, in)
    bias = torch.cat([layer.bias for layer in layers])  # (sum of out,)
    return F.linear(x, weight, bias)  # (..., sum of out)


class BehaviorEmbedding(nn.Module):
    """Embed each behaviour into its group's space, then project it to the common width (§3.2).

    u_ij = F_M_i(emb(o_j) + lookup_t_i(bucket(t_j)) + lookup_a_i(a_j)). The object embedding
    (item ⊕ category) is shared by all groups; time and action lookups and the projection F_M
    belong to one group each.

    `time_mode="concat"` is the reference Amazon code: one-hot(bucket) (and, in the multi-behaviour
    code, the action embedding) concatenated to the object embedding, then a dense layer. A dense
    layer over [x ⊕ one_hot(t)] equals dense(x) + W_t[t], so each group stores W_t as its own
    (time_buckets, D) table added after the projection. `time_mode="add"` is the paper's lookup:
    a (time_buckets, 2E) table added to the object embedding before the projection.

    Args:
        num_items: item vocabulary size (row 0 = padding).
        num_cates: category vocabulary size (row 0 = padding).
        num_behaviors: behaviour vocabulary size (row 0 = padding); sizes the action tables.
        num_groups: number of behaviour groups G.
        embed_dim: item and category embedding width E; objects are 2E wide.
        dim: common width D of the projected behaviours.
        time_buckets: number of log2 time buckets T.
        time_mode: "concat" or "add".
        use_actions: whether each group has an action lookup.
        sparse: the item and category tables produce sparse (row) gradients; "auto": decided
            per run (`optim.resolve_sparse_embeddings`).
    """

    def __init__(
        self,
        *,
        num_items: int,
        num_cates: int,
        num_behaviors: int,
        num_groups: int,
        embed_dim: int,
        dim: int,
        time_buckets: int,
        time_mode: str,
        use_actions: bool,
        sparse: bool | str = False,
    ) -> None:
        super().__init__()
        self.time_mode = time_mode
        # sparse: the backward pass touches only the looked-up rows, not the 63k x 64 table
        self.item = embedding_table(num_items, embed_dim, sparse)
        self.cate = embedding_table(num_cates, embed_dim, sparse)
        _glorot_(self.item.weight, num_items, embed_dim)
        _glorot_(self.cate.weight, num_cates, embed_dim)
        obj = 2 * embed_dim
        # per group, never shared: the same action or gap means different things per group
        if time_mode == "concat":
            fan_in = obj + time_buckets + (num_behaviors if use_actions else 0)
            self.proj = nn.ModuleList(nn.Linear(obj, dim) for _ in range(num_groups))
            self.time = nn.ModuleList(nn.Embedding(time_buckets, dim) for _ in range(num_groups))
            self.action = nn.ModuleList(
                nn.Embedding(num_behaviors, dim) for _ in range(num_groups if use_actions else 0)
            )
            for table in (*self.proj, *self.time, *self.action):
                _glorot_(table.weight, fan_in, dim)  # slices of one dense kernel
            for p in self.proj:
                nn.init.zeros_(p.bias)
        else:
            self.proj = nn.ModuleList(_dense(obj, dim) for _ in range(num_groups))
            self.time = nn.ModuleList(nn.Embedding(time_buckets, obj) for _ in range(num_groups))
            self.action = nn.ModuleList(
                nn.Embedding(num_behaviors, obj) for _ in range(num_groups if use_actions else 0)
            )
            for table in (*self.time, *self.action):
                _glorot_(table.weight, table.num_embeddings, obj)

    def objects(self, item: Tensor, cate: Tensor) -> Tensor:
        """Args:
            item: (...) item ids.
            cate: (...) category ids.

        Returns:
            (..., 2E) object embeddings emb(o) = item ⊕ category.
        """
        return torch.cat([self.item(item), self.cate(cate)], dim=-1)  # (..., 2E)

    def forward(self, obj: Tensor, bucket: Tensor, action: Tensor | None, group: Tensor) -> Tensor:
        """Args:
            obj: (B, L, 2E) object embeddings (`objects`).
            bucket: (B, L) time bucket ids.
            action: (B, L) action (behaviour) ids, or None when actions are not used.
            group: (B, L) group index of each behaviour in [0, G).

        Returns:
            (B, L, D) behaviours in the common space.
        """
        per_group = []
        for g, proj in enumerate(self.proj):  # G is small: loop over groups, not samples
            extra = self.time[g](bucket)  # (B, L, D or 2E)
            if action is not None:
                extra = extra + self.action[g](action)  # (B, L, D or 2E)
            if self.time_mode == "concat":
                per_group.append(proj(obj) + extra)  # (B, L, D)
            else:
                per_group.append(proj(obj + extra))  # (B, L, D)
        if len(per_group) == 1:
            return per_group[0]
        stacked = torch.stack(per_group, dim=-2)  # (B, L, G, D)
        index = group[..., None, None].expand(-1, -1, 1, stacked.shape[-1])  # (B, L, 1, D)
        return stacked.gather(-2, index).squeeze(-2)  # (B, L, D)


class Attention(nn.Module):
    """Multi-head attention as in the reference code: ReLU-activated dense Q/K/V, no output
    projection, key and query masking, dropout on the weights, residual + layer norm.

    Args:
        dim: width D of queries, keys and outputs.
        num_heads: number of heads H (latent spaces); divides D.
        dropout: dropout on the attention weights.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = _dense(dim, dim)
        self.k = _dense(dim, dim)
        self.v = _dense(dim, dim)
        self.dropout = dropout
        self.ln = nn.LayerNorm(dim, eps=1e-8)

    def forward(
        self,
        queries: Tensor,
        query_mask: Tensor,
        keys: Tensor,
        key_mask: Tensor,
        return_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Args:
            queries: (B, Q, D).
            query_mask: (B, Q) bool, True at real queries.
            keys: (B, L, D).
            key_mask: (B, L) bool, True at real keys.
            return_weights: also compute the attention weights (explicitly, for plots).

        Returns:
            (B, Q, D) outputs and, if asked, the (B, H, Q, L) attention weights (before
            dropout; else None); weights are 0 on padded keys and padded queries, and on every
            key of a row without real keys.
        """
        B, Q, D = queries.shape
        H = self.num_heads
        # "latent spaces": each head sees the behaviours through its own slice of a ReLU dense;
        # the denses that read the same input run as one (one GEMM, one ReLU pass)
        p = self.dropout if self.training else 0.0
        if queries is keys:
            qkv = _stacked(queries, self.q, self.k, self.v).view(B, Q, 3, H, D // H)
            if not return_weights:  # the ReLU inside the attention kernel (one pass fewer)
                out = self_attention(qkv, key_mask, query_mask, p, relu=True)  # (B, Q, D)
                return self.ln(out + queries), None
            q, k, v = F.relu(qkv).unbind(2)  # 3 x (B, L, H, D/H)
        else:
            q = self.q(queries).view(B, Q, H, D // H)  # (B, Q, H, D/H)
            kv = _stacked(keys, self.k, self.v).view(B, -1, 2, H, D // H)  # (B, L, 2, H, D/H)
            if not return_weights:
                out = cross_attention(q, kv, key_mask, query_mask, p, relu=True)  # (B, Q, D)
                return self.ln(out + queries), None
            q, (k, v) = F.relu(q), F.relu(kv).unbind(2)  # (B, Q, H, D/H), 2 x (B, L, H, D/H)
        weights = None
        if return_weights:
            weights = attention_weights(q, k, key_mask, query_mask)  # (B, H, Q, L)
            out = apply_dropout(weights, p) @ v.transpose(1, 2)  # (B, H, Q, D/H)
            out = out.transpose(1, 2).reshape(B, Q, D)  # (B, Q, D)
        else:
            out = attention(q, k, v, key_mask, query_mask, p)  # (B, Q, D)
        return self.ln(out + queries), weights

    def forward_groups(
        self,
        x: Tensor,
        masks: Sequence[Tensor],
        real: Tensor | None = None,
        offsets: Tensor | None = None,
    ) -> Tensor:
        """Self-attention of length groups, their tokens flat: the Q/K/V denses, the residual
        and the layer norm run once over every token; the attention on CPU with the fused
        kernel over each sequence's real behaviours alone (`ragged_self_attention`), elsewhere
        per group on the groups' padded layout.

        Args:
            x: (T, D) the behaviours of every group, group after group, each group's (n, L)
                positions row-major; T = the sum of the masks' sizes. With `real`: (R, D), only
                the real behaviours (the masks' true positions, in that order).
            masks: per group, its (n, L) bool mask.
            real: (R,) int64, where the rows of x sit among the groups' T positions (see
                `layers.ragged.real_positions`), or None when x holds all T positions.
            offsets: `layers.ragged.sequence_offsets(masks)` when x holds exactly the real
                behaviours (with `real`, or when every position is real): then, where the fused
                CPU kernel runs, the attention goes over each sequence's behaviours alone.

        Returns:
            (T, D) outputs, as `forward(x_g, m, x_g, m)` gives them for each group ((R, D): the
            real positions' outputs, with `real`).
        """
        D, H = x.shape[-1], self.num_heads
        p = self.dropout if self.training else 0.0
        if offsets is not None and ragged_kernel(x) is not None:  # x: real behaviours only
            qkv = _stacked(x, self.q, self.k, self.v).view(-1, 3, H, D // H)  # (R or T, 3, H, d)
            return self.ln(ragged_self_attention(qkv, offsets, p, relu=True) + x)  # (R or T, D)
        T = sum(m.numel() for m in masks)
        qkv = to_positions(_stacked(x, self.q, self.k, self.v), real, T)  # (T, 3D)
        out = [
            self_attention(qkv.view(*m.shape, 3, H, D // H), m, m, p, relu=True).reshape(-1, D)
            for qkv, m in zip(qkv.split([m.numel() for m in masks]), masks, strict=True)
        ]  # (n * L, D) per group
        out = torch.cat(out)  # (T, D)
        if real is not None:
            out = out.index_select(0, real)  # (R, D)
        return self.ln(out + x)  # (T or R, D)

    def forward_target_groups(
        self,
        u: Tensor,
        keys: Tensor,
        masks: Sequence[Tensor],
        real: Tensor | None = None,
        offsets: Tensor | None = None,
    ) -> Tensor:
        """The vanilla attention of length groups: one query per sample to its group's keys.

        Args:
            u: (B, D) queries, group after group (n rows per group).
            keys: (T, D) the behaviours of every group, flat as in `forward_groups`; with
                `real`, (R, D) the real ones.
            masks: per group, its (n, L) bool key mask.
            real, offsets: as in `forward_groups`.

        Returns:
            (B, D) outputs, as `forward(u_g[:, None], ones, keys_g, m)` gives them per group.
        """
        D, H = u.shape[-1], self.num_heads
        p = self.dropout if self.training else 0.0
        if offsets is not None and ragged_kernel(u) is not None:  # one query, the real keys
            queries = torch.arange(len(u) + 1, device=u.device)  # (B + 1,) one row each
            kv = _stacked(keys, self.k, self.v).view(-1, 2, H, D // H)  # (R or T, 2, H, d)
            out = ragged_cross_attention(
                self.q(u).view(-1, H, D // H), kv, queries, offsets, p, relu=True
            )
            return self.ln(out + u)  # (B, D)
        q = self.q(u).view(-1, 1, H, D // H).split([m.shape[0] for m in masks])  # (n, 1, H, d)
        T = sum(m.numel() for m in masks)
        kv = to_positions(_stacked(keys, self.k, self.v), real, T)  # (T, 2D)
        kv = kv.split([m.numel() for m in masks])  # (n * L, 2D) per group
        out = [
            cross_attention(q_g, kv_g.view(*m.shape, 2, H, D // H), m, None, p, relu=True)
            for q_g, kv_g, m in zip(q, kv, masks, strict=True)
        ]  # (n, 1, D) per group
        return self.ln(torch.cat(out).view(-1, D) + u)  # (B, D)


class FeedForward(nn.Module):
    """Point-wise feed-forward of widths (D/4, D), residual + layer norm (reference code)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.inner = _dense(dim, dim // 4)
        self.outer = _dense(dim // 4, dim)
        self.ln = nn.LayerNorm(dim, eps=1e-8)

    def forward(self, x: Tensor) -> Tensor:
        """Args:
            x: (B, Q, D).

        Returns:
            (B, Q, D).
        """
        return self.ln(x + self.outer(F.relu(self.inner(x))))  # (B, Q, D)


class Block(nn.Module):
    """One attention + feed-forward block (used for both the self- and the vanilla attention)."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads, dropout)
        self.ffn = FeedForward(dim)

    def forward(
        self,
        queries: Tensor,
        query_mask: Tensor,
        keys: Tensor,
        key_mask: Tensor,
        return_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Shapes as in `Attention.forward`."""
        x, weights = self.attn(queries, query_mask, keys, key_mask, return_weights)  # (B, Q, D)
        return self.ffn(x), weights

    def forward_groups(
        self,
        x: Tensor,
        masks: Sequence[Tensor],
        real: Tensor | None = None,
        offsets: Tensor | None = None,
    ) -> Tensor:
        """Self-attention block of length groups, tokens flat (`Attention.forward_groups`)."""
        return self.ffn(self.attn.forward_groups(x, masks, real, offsets))  # (T or R, D)

    def forward_target_groups(
        self,
        u: Tensor,
        keys: Tensor,
        masks: Sequence[Tensor],
        real: Tensor | None = None,
        offsets: Tensor | None = None,
    ) -> Tensor:
        """Vanilla attention block of length groups (`Attention.forward_target_groups`)."""
        return self.ffn(self.attn.forward_target_groups(u, keys, masks, real, offsets))  # (B, D)


class ATRank(nn.Module):
    """Attention-based user behaviour modelling for ranking.

    Groups: `group_by="item"` puts every behaviour in one item group (Taobao pv/cart/fav/buy are
    all interactions with an item) and tells them apart with the group's action lookup;
    `group_by="behavior"` makes every behaviour id its own group with its own time table, action
    table and projection (a group then holds one action, so its action vector acts as a
    learned per-group offset).

    Target: the candidate's object embedding goes through the item group's projection F_M with
    no time and no action (as `multi/model.py` does, zero-padding those inputs); in "behavior"
    mode the candidate is not a behaviour of any one group, so it has its own projection.

    Args:
        schema: the dataset schema; sizes the vocabularies.
        embed_dim: item and category embedding width E; behaviours are projected to D = 2E.
        num_heads: number of heads (latent spaces) H; must divide 2 * embed_dim.
        num_layers: number of blocks in the self-attention and in the vanilla attention.
        dropout: dropout on attention weights.
        max_len: longest history used; longer histories keep the most recent max_len events.
        time_buckets: number of log2 time-gap buckets.
        time_unit_seconds: time unit of the buckets (a day in the paper).
        time_mode: "concat" (reference Amazon code) or "add" (paper's lookup).
        group_by: "item" or "behavior".
        use_actions: whether to embed the action type (only with more than one behaviour).
        l2_reg: rate of the L2 penalty on the user and target vectors (see `regularization`).
        length_groups: run each batch as up to this many groups of similar history length,
            each cut to its own longest history, the layers other than the attention on real
            behaviours only, so padding costs few FLOPs (the same outputs and gradients; see
            `layers.ragged` and `forward_groups`); 0 = pad every batch to max_len.
        sparse_embeddings: True: the item and category tables produce sparse gradients holding
            only the rows in the batch (`nn.Embedding(sparse=True)`); train with
            `seqrank.optim.Adam`, which then runs dense Adam's update without a dense gradient
            (or, with `lazy=True`, updates only those rows). False: dense gradients. "auto":
            dense until `RankingModule` resolves it for the run (`optim.resolve_sparse_embeddings`:
            sparse where the updates are dense Adam's and faster, i.e. seqrank's Adam, CPU, one
            process).

    Raises:
        ValueError: on an invalid hyperparameter, naming it, its value and what is allowed.
    """

    def __init__(
        self,
        schema: Schema,
        *,
        embed_dim: int = 64,
        num_heads: int = 8,
        num_layers: int = 1,
        dropout: float = 0.0,
        max_len: int = 50,
        time_buckets: int = 12,
        time_unit_seconds: float = 86400.0,
        time_mode: str = "concat",
        group_by: str = "item",
        use_actions: bool = True,
        l2_reg: float = 5e-5,
        length_groups: int = 4,
        sparse_embeddings: bool | str = "auto",
    ) -> None:
        super().__init__()
        check_sparse_embeddings(sparse_embeddings, "ATRank")
        _check(embed_dim >= 2, "embed_dim", embed_dim, "an integer >= 2")
        dim = 2 * embed_dim
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(
                f"num_heads={num_heads} must divide the attention width 2*embed_dim={dim}"
            )
        _check(num_layers >= 1, "num_layers", num_layers, "an integer >= 1")
        _check(0.0 <= dropout < 1.0, "dropout", dropout, "a float in [0, 1)")
        _check(max_len >= 1, "max_len", max_len, "an integer >= 1")
        _check(time_buckets >= 1, "time_buckets", time_buckets, "an integer >= 1")
        _check(time_unit_seconds > 0, "time_unit_seconds", time_unit_seconds, "a float > 0")
        _check(time_mode in TIME_MODES, "time_mode", time_mode, f"one of {TIME_MODES}")
        _check(group_by in GROUP_BYS, "group_by", group_by, f"one of {GROUP_BYS}")
        _check(l2_reg >= 0, "l2_reg", l2_reg, "a float >= 0")
        _check(length_groups >= 0, "length_groups", length_groups, "an integer >= 0")
        _check(
            schema.num_behaviors >= 2,
            "schema.num_behaviors",
            schema.num_behaviors,
            "an integer >= 2 (padding + at least one behaviour)",
        )
        self.max_len = max_len
        self.time_buckets = time_buckets
        self.time_unit_seconds = time_unit_seconds
        self.group_by = group_by
        self.l2_reg = l2_reg
        self.length_groups = length_groups
        self.group_cost = GROUP_COST_TOKENS
        # Amazon has a single action: there is nothing for an action lookup to tell apart
        self.use_actions = use_actions and schema.num_behaviors > 2
        self.num_groups = 1 if group_by == "item" else schema.num_behaviors - 1

        self.behaviors = BehaviorEmbedding(
            num_items=schema.num_items,
            num_cates=schema.num_cates,
            num_behaviors=schema.num_behaviors,
            num_groups=self.num_groups,
            embed_dim=embed_dim,
            dim=dim,
            time_buckets=time_buckets,
            time_mode=time_mode,
            use_actions=self.use_actions,
            sparse=sparse_embeddings,
        )
        self.candidate = _dense(2 * embed_dim, dim) if group_by == "behavior" else None
        self.item_bias = nn.Parameter(torch.zeros(schema.num_items))
        self.self_blocks = nn.ModuleList(Block(dim, num_heads, dropout) for _ in range(num_layers))
        self.target_blocks = nn.ModuleList(
            Block(dim, num_heads, dropout) for _ in range(num_layers)
        )
        self._user: Tensor | None = None
        self._target: Tensor | None = None

    def embed_target(self, obj: Tensor) -> Tensor:
        """Args:
            obj: (B, 2E) candidate object embeddings.

        Returns:
            (B, D) candidate vectors in the common space.
        """
        if self.candidate is not None:
            return self.candidate(obj)  # (B, D)
        return self.behaviors.proj[0](obj)  # (B, D): item group's F_M, no time, no action

    def forward(
        self, batch: Batch, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, dict[str, Tensor | list[Tensor]]]:
        """Score candidates against the user's behaviours.

        Args:
            batch: histories (B, L) left-padded, candidates (B,).
            return_attention: also return the attention weights of both stages.

        Returns:
            (B,) logits; with return_attention also {"self": [(B, H, L, L)] per block,
            "target": (B, L) vanilla attention of the last block, averaged over heads}.
        """
        # length groups; not for attention plots, nor compiled (static shapes: the padded batch)
        if not return_attention and self.length_groups and not torch.compiler.is_compiling():
            if ragged_kernel(self.item_bias) is not None:
                # the attention over each sequence's real behaviours, every other layer on
                # them too: padding costs nothing, one group (the batch) has the fewest calls
                split = whole_batch(batch, self.max_len)
            else:
                split = batch_groups(batch, self.max_len, self.length_groups, self.group_cost)
            if split is not None:
                return self.forward_groups(batch, *split)
        L = min(batch.hist_item.shape[1], self.max_len)
        item, cate, bucket, action, group, mask = self.history(batch)  # (B, L) each
        # history and candidates in one lookup per table: one dense gradient per table
        obj = self.behaviors.objects(
            torch.cat([item, batch.target_item[:, None]], dim=1),
            torch.cat([cate, batch.target_cate[:, None]], dim=1),
        )  # (B, L+1, 2E)
        hist_obj, target_obj = obj.split([L, 1], dim=1)  # (B, L, 2E), (B, 1, 2E)
        h = self.behaviors(hist_obj, bucket, action, group)  # (B, L, D)
        target = self.embed_target(target_obj.squeeze(1))  # (B, D)
        u, stt, att = self.attend(h, mask, target, return_attention)  # (B, D)

        self._user, self._target = u, target
        logits = self.item_bias[batch.target_item] + (u * target).sum(-1)  # (B,)
        if return_attention:
            return logits, {"self": stt, "target": att.mean(dim=1).squeeze(1)}  # (B, L)
        return logits

    def history(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor, Tensor]:
        """The history's ids, cut to the most recent max_len events.

        Returns:
            (B, L) item, category, time bucket, action (None without actions), group index and
            bool mask, L = min(L_in, max_len).
        """
        L = min(batch.hist_item.shape[1], self.max_len)
        item, cate = batch.hist_item[:, -L:], batch.hist_cate[:, -L:]  # (B, L): most recent
        behavior, mask = batch.hist_behavior[:, -L:], batch.hist_mask[:, -L:]  # (B, L)
        bucket = log2_time_bucket(
            batch.hist_gap[:, -L:], self.time_buckets, self.time_unit_seconds
        )  # (B, L)
        if self.group_by == "item":
            group = torch.zeros_like(behavior)  # (B, L)
        else:
            group = (behavior - 1).clamp(0, self.num_groups - 1)  # (B, L); pads masked anyway
        action = behavior if self.use_actions else None
        return item, cate, bucket, action, group, mask

    def attend(
        self, h: Tensor, mask: Tensor, target: Tensor, return_attention: bool = False
    ) -> tuple[Tensor, list[Tensor | None], Tensor | None]:
        """Self-attention over the behaviours, then the vanilla attention from the target.

        Args:
            h: (B, L, D) projected behaviours; mask: (B, L) bool; target: (B, D).

        Returns:
            (B, D) user vectors (zero without behaviours), the self-attention weights per block
            and the (B, H, 1, L) target attention of the last block (None unless asked).
        """
        stt = []
        for block in self.self_blocks:  # self-attention in K latent spaces
            h, w = block(h, mask, h, mask, return_attention)  # (B, L, D), (B, H, L, L)
            stt.append(w)
        u = target[:, None]  # (B, 1, D)
        one = torch.ones_like(mask[:, :1])  # (B, 1)
        for block in self.target_blocks:  # vanilla attention from the target
            u, att = block(u, one, h, mask, return_attention)  # (B, 1, D), (B, H, 1, L)
        has_history = mask.any(dim=1, keepdim=True)  # (B, 1)
        return u.squeeze(1) * has_history, stt, att  # (B, D): no behaviours, no user vector

    def forward_groups(
        self, batch: Batch, groups: list[tuple[Batch, int]], order: Tensor | None
    ) -> Tensor:
        """`forward` on length groups: one lookup, one projection and one pass of every dense
        layer and layer norm over the real behaviours of all groups (not the groups' padding);
        the attention over each sequence's real behaviours (the ragged CPU kernel: then the
        batch is one group, `whole_batch`), or elsewhere per group at the group's own length.

        Args:
            batch: the whole batch; groups: [(group batch, history length)]; order: (B,) rows
                of the batch, group by group (`batch_groups`), or None: one group of all rows
                in batch order (`whole_batch`).

        Returns:
            (B,) logits in batch order.
        """
        parts = [self.history(sub) for sub, _ in groups]  # (n, L) each
        masks = [p[5] for p in parts]  # (n, L) each
        # the real behaviours: a group's histories are cut to its longest, so ~40% of its
        # positions are padding on 5-core-like data; every layer but the attention works on
        # each behaviour alone, so only the real ones go through them (ids, lookups,
        # projections, feed-forwards, layer norms), laid out at the groups' positions for the
        # attention alone; a batch without padding keeps them all (no gather)
        real = real_positions(masks)  # (R,) or None

        def flat(k: int) -> Tensor | None:  # field k of every group as one (1, R or T) row
            if parts[0][k] is None:
                return None
            field = torch.cat([p[k].reshape(-1) for p in parts])  # (T,)
            return (field if real is None else field[real])[None]

        item = flat(0)[0]
        obj = self.behaviors.objects(
            torch.cat([item, batch.target_item if order is None else batch.target_item[order]]),
            torch.cat(
                [flat(1)[0], batch.target_cate if order is None else batch.target_cate[order]]
            ),
        )  # (R + B, 2E)
        # split, not two slices: a slice's backward zero-fills the whole (R + B, 2E) gradient
        hist_obj, target_obj = obj.split([len(item), len(batch.target_item)])  # (R, 2E), (B, 2E)
        h = self.behaviors(hist_obj[None], flat(2), flat(3), flat(4))[0]  # (R, D)
        target = self.embed_target(target_obj)  # (B, D) in group order
        # the blocks over the behaviours of all groups at once, only the attention per group
        # (the attention over each sequence's real behaviours with the CPU kernel)
        offsets = sequence_offsets(masks) if ragged_kernel(h) is not None else None
        for block in self.self_blocks:
            h = block.forward_groups(h, masks, real, offsets)  # (R, D)
        u = target  # (B, D)
        for block in self.target_blocks:
            u = block.forward_target_groups(u, h, masks, real, offsets)  # (B, D)
        has_history = torch.cat([m.any(dim=1) for m in masks])[:, None]  # (B, 1)
        u = u * has_history  # (B, D) in group order; no behaviours, no user vector
        self._user, self._target = u, target
        score = (u * target).sum(-1)  # (B,) in group order
        if order is not None:
            score = score[inverse_permutation(order)]  # (B,) in batch order
        return self.item_bias[batch.target_item] + score

    def regularization(self) -> Tensor:
        """L2 penalty of the last forward: l2_reg * (|u|^2 + |v|^2) / 2, averaged over the batch.

        Returns:
            () scalar tensor.

        Raises:
            RuntimeError: if called before any forward.
        """
        if self._user is None or self._target is None:
            raise RuntimeError("ATRank.regularization() needs a forward pass first")
        sq = self._user.pow(2).sum() + self._target.pow(2).sum()
        return self.l2_reg * sq / (2 * self._user.shape[0])


def _check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"ATRank: {key}={value!r} is invalid; allowed: {allowed}")
