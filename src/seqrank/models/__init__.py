"""Ranking models: one file per paper model, composed from `seqrank.models.layers`."""

from seqrank.models.bst import BST

__all__ = ["BST"]
