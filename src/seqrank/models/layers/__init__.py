"""Model-agnostic building blocks: attention, Transformer, MLP, time-gap embeddings."""

from seqrank.models.layers.attention import MultiHeadSelfAttention
from seqrank.models.layers.dropout import Dropout
from seqrank.models.layers.mlp import MLP, make_activation
from seqrank.models.layers.time import TimeBucketEmbedding, log2_time_bucket
from seqrank.models.layers.transformer import TransformerBlock, TransformerEncoder

__all__ = [
    "MLP",
    "Dropout",
    "MultiHeadSelfAttention",
    "TimeBucketEmbedding",
    "TransformerBlock",
    "TransformerEncoder",
    "log2_time_bucket",
    "make_activation",
]
