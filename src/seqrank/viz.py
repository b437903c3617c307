"""Attention plots: for a few users, the target's attention over the history, each event
coloured by behaviour type (PNG; logged as an image when a logger supports it)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from seqrank.data.types import Batch, Schema  # noqa: E402


def target_attention(net: nn.Module, batch: Batch) -> Tensor:
    """(B, L) attention of the target over the history (mean over heads, last layer).

    ATRank: the vanilla-attention stage; BST: the target's row of the last self-attention
    block (its weight on itself is dropped). Padded positions get 0.
    """
    net.eval()
    with torch.no_grad():
        if hasattr(net, "attention_weights"):  # BST
            w = net.attention_weights(batch)[-1].mean(1)  # (B, L+1, L+1)
            att = w[:, -1, :-1]  # (B, L') target row, history keys
        else:  # ATRank
            _, weights = net(batch, return_attention=True)
            att = weights["target"]  # (B, L')
    L = batch.hist_item.shape[1]
    if att.shape[1] < L:  # the net cut the history to its max_len: left-pad back
        att = torch.nn.functional.pad(att, (L - att.shape[1], 0))
    return att * batch.hist_mask


def plot_target_attention(
    net: nn.Module, batch: Batch, schema: Schema, path: str | Path, *, num_users: int = 4
) -> Path:
    """Draws one bar row per sample: attention per history event, coloured by behaviour."""
    att = target_attention(net, batch).float().cpu().numpy()
    beh = batch.hist_behavior.cpu().numpy()
    mask = batch.hist_mask.cpu().numpy()
    n = min(num_users, len(att))
    names = ("pad", *schema.behavior_names)
    colors = plt.get_cmap("tab10")(np.arange(max(len(names), 2)))
    fig, axes = plt.subplots(n, 1, figsize=(10, 1.8 * n), squeeze=False)
    for r in range(n):
        ax = axes[r, 0]
        x = np.arange(att.shape[1])
        ax.bar(x[mask[r]], att[r][mask[r]], color=colors[beh[r][mask[r]]])
        ax.set_ylabel(f"user {int(batch.user[r])}\nlabel {int(batch.label[r])}", fontsize=8)
        ax.set_xlim(-0.5, att.shape[1] - 0.5)
    axes[-1, 0].set_xlabel("history position (right = most recent)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[i]) for i in range(1, len(names))]
    fig.suptitle(f"target attention over the history — {type(net).__name__} on {schema.name}")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.legend(
        handles,
        names[1:],
        loc="upper center",
        bbox_to_anchor=(0.5, 0.955),
        ncols=len(names) - 1,
        fontsize=8,
        frameon=False,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
