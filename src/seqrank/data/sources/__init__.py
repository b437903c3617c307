"""One module per raw source format; each `read_<source>()` returns the canonical events table."""
