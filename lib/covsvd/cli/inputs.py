"""What a verb reads: the model (its ``Auto*`` class, dtype and device) and the calibration batches.

torch, transformers and the data readers are imported inside the functions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .checks import CLIError, check_input

DTYPES = ("float32", "bfloat16", "float16")
MODEL_CLASSES = ("auto", "causal-lm", "base")


def model_class(path: Path, choice: str = "auto"):
    """The transformers ``Auto*`` class to load ``path`` with.

    ``auto``: ``AutoModelForCausalLM`` when an architecture in ``config.json`` is a causal LM (its name ends
    in ``ForCausalLM``, or ``AutoModelForCausalLM`` maps a model type to it, e.g. ``GPT2LMHeadModel``):
    decoder LLMs keep their output head, so an exported checkpoint is complete. Else ``AutoModel`` (the bare
    encoder / decoder). ``causal-lm`` / ``base`` force one of them.
    """
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if choice == "auto":
        try:
            archs = json.loads((path / "config.json").read_text()).get("architectures") or []
        except (OSError, ValueError):
            archs = []  # load_model raises, naming the missing checkpoint
        causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
        choice = "causal-lm" if any(str(a).endswith("ForCausalLM") or a in causal for a in archs) else "base"
    return AutoModelForCausalLM if choice == "causal-lm" else AutoModel


def load(args: argparse.Namespace, device):
    """``(model, tokenizer)`` from ``--model`` in ``--dtype`` on ``device``, eval mode."""
    import torch

    import covsvd

    path = covsvd.data.default_model_path() if args.model == "default" else Path(args.model)
    model, tokenizer = covsvd.load_model(path, dtype=getattr(torch, args.dtype),
                                         model_class=model_class(Path(path), args.model_class))
    return model.to(device), tokenizer


def check_data(args: argparse.Namespace) -> None:
    """Refuse data options that cannot work together (:class:`CLIError`), and a ``--data`` file that is not
    there, before the model is loaded."""
    if args.prompt_field and not args.data:
        raise CLIError("--prompt-field needs --data (a .jsonl or .parquet file with that field)")
    if token_mask(args) is not None and not args.prompt_field:
        raise CLIError("--token-mask labels needs labels: give --prompt-field (instruction data in a .jsonl / "
                       ".parquet file); plain text has none")
    check_input(args.data, "--data")


def make_batches(args: argparse.Namespace, tokenizer) -> list:
    """Calibration batches from ``--data`` (or the embedded corpus), ``labels`` kept only for ``--token-mask labels``
    (the options checked by :func:`check_data`)."""
    import covsvd

    from ..data import textfiles as textdata

    size = dict(seq_len=args.seq_len, batch_size=args.batch_size, max_tokens=args.max_tokens)
    if args.prompt_field:
        batches = textdata.prompt_batches(tokenizer, args.data, args.prompt_field, args.text_field, **size)
        if token_mask(args) is None:  # every token counts: the labels are not passed on
            batches = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
        return batches
    if args.data:
        return textdata.text_batches(tokenizer, args.data, args.text_field, split=args.split or "all", **size)
    return covsvd.calibration_batches(tokenizer, split=args.split or "train", **size)


def token_mask(args: argparse.Namespace) -> str | None:
    """``"labels"`` (count only tokens whose label is not -100) or ``None`` (every real token)."""
    mode = args.token_mask or ("labels" if args.prompt_field else "all")
    return "labels" if mode == "labels" else None
