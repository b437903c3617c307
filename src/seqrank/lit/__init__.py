"""LightningModules: the training loop's side of seqrank (no architecture lives here)."""
