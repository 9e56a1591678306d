"""covsvd: covariance-oriented SVD initialisation of adapters, exactly.

    import covsvd
    model, tokenizer = covsvd.load_default_model()          # embedded all-MiniLM-L6-v2, offline
    batches = covsvd.calibration_batches(tokenizer)          # pydoc_data.topics, train split
    moments = covsvd.capture_moments(model, batches)         # {module name: SecondMoment}
    o = covsvd.orient(W, moments[name], r=64, metric="full", eps=1e-3)
    covsvd.attach_adapters(model, moments, r=64, metric="diag")

One concept per module: ``corpus`` (text -> batches), ``models`` (offline loading), ``targets`` (which
modules, Conv1D boundary), ``moments`` (the running sums), ``capture`` (hooks), ``io`` (safetensors files),
``orient`` (the algebra, pure tensors), ``rotation`` (Cayley), ``adapter`` (the bounded-gain layer).
"""

from .adapter import (
    AttachReport,
    BoundedGainLinear,
    adapters,
    attach_adapters,
    detach_adapters,
    load_adapters,
    save_adapters,
    trainable_parameters,
)
from .cache import cached_capture
from .capture import capture_moments
from .corpus import calibration_batches, count_tokens, passages
from .io import load_moments, save_moments
from .models import default_model_path, load_default_model, load_model, model_identity
from .moments import SecondMoment
from .orient import Oriented, orient
from .targets import find_targets, weight_matrix

__version__ = "0.1.0"

__all__ = [
    "AttachReport",
    "adapters",
    "trainable_parameters",
    "BoundedGainLinear",
    "Oriented",
    "SecondMoment",
    "attach_adapters",
    "cached_capture",
    "calibration_batches",
    "capture_moments",
    "count_tokens",
    "default_model_path",
    "detach_adapters",
    "find_targets",
    "load_adapters",
    "load_default_model",
    "load_model",
    "load_moments",
    "model_identity",
    "orient",
    "passages",
    "save_adapters",
    "save_moments",
    "weight_matrix",
]
