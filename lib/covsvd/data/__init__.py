"""Stage 1, data: calibration text -> batches, models loaded offline, which layers are targets, and which
model (and weights) a result belongs to."""

from .corpus import Passage, calibration_batches, count_tokens, passages
from .fingerprint import check_same_model, model_identity
from .models import default_model_path, load_default_model, load_model
from .targets import find_targets, weight_matrix
from .textfiles import IGNORE_INDEX, prompt_batches, read_texts, text_batches

__all__ = [
    "IGNORE_INDEX",
    "Passage",
    "calibration_batches",
    "check_same_model",
    "count_tokens",
    "default_model_path",
    "find_targets",
    "load_default_model",
    "load_model",
    "model_identity",
    "passages",
    "prompt_batches",
    "read_texts",
    "text_batches",
    "weight_matrix",
]
