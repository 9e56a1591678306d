"""On top of the pipeline: ``python -m covsvd`` / ``covsvd`` (capture, init, and the lab's verbs)."""
