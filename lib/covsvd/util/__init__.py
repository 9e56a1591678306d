"""Below the pipeline: argument checks, digests and atomic file writes (no covsvd types)."""
