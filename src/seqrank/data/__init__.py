"""Data: raw readers, synthetic generators, preprocessing into the ragged store, batching."""
