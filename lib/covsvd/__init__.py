"""covsvd: covariance-oriented SVD initialisation of adapters, exactly.

    import covsvd
    model, tokenizer = covsvd.load_default_model()          # embedded all-MiniLM-L6-v2, offline
    batches = covsvd.calibration_batches(tokenizer)          # pydoc_data.topics, train split
    moments = covsvd.capture_moments(model, batches)         # {module name: SecondMoment}
    o = covsvd.orient(W, moments[name], r=64, metric="full")
    covsvd.attach_adapters(model, moments, r=64, metric="diag")

The core, one concept per module: ``corpus`` (text -> batches), ``models`` (offline loading), ``targets``
(which modules, the Conv1D boundary), ``moments`` / ``gram`` (the running sums), ``hooks`` / ``rows`` /
``capture`` (capture), ``io`` / ``cache`` (moments files), ``damping`` / ``thinsvd`` / ``orient`` (the
algebra, pure tensors), ``measures``, ``rotation`` (Cayley), ``layer`` (the bounded-gain layer), ``attach``
and ``serialize`` (adapters on a model, and in files). It imports torch, safetensors, tqdm and transformers
only; the research lab (``covsvd.lab``: ablations, sweeps, plotting, the notebook runner) sits beside it.
The algebra is docs/algebra.md.
"""

from .adapt.allocate import (
    allocate_ranks,
    allocation_cost,
    allocation_error,
    layer_spectra,
    optimal_ranks,
    rank_costs,
)
from .adapt.attach import (
    AttachReport,
    adapter_parameters,
    adapters,
    attach_adapters,
    detach_adapters,
    disable_adapters,
    trainable_parameters,
)
from .adapt.files import load_adapters, save_adapters
from .adapt.init import init_adapters
from .adapt.layer import BoundedGainLinear
from .adapt.sufficiency import (
    InsufficientCalibrationWarning,
    basis_angles,
    check_sufficient,
    layer_angles,
    split_half,
)
from .algebra.damping import DEFAULT_EPS, DEFAULT_EPS_MODE, Damped, damp
from .algebra.measures import functional_error, identity_error, principal_angles, quad
from .algebra.orient import METRICS, Oriented, orient
from .capture.cache import cache_path, cached_capture
from .capture.files import load_moments, save_moments
from .capture.hooked import MomentCapture
from .capture.layerwise import find_blocks, iter_block_moments
from .capture.memory import MemoryEstimate, estimate_memory
from .capture.moments import SecondMoment
from .capture.run import capture_moments
from .data.corpus import calibration_batches, count_tokens, passages
from .data.fingerprint import model_identity
from .data.models import default_model_path, load_default_model, load_model
from .data.targets import find_targets, weight_matrix
from .data.textfiles import prompt_batches, read_texts, text_batches
from .export.lora_delta import export_lora_delta
from .export.peft import export_peft
from .version import __version__

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_EPS_MODE",
    "METRICS",
    "AttachReport",
    "BoundedGainLinear",
    "Damped",
    "InsufficientCalibrationWarning",
    "MemoryEstimate",
    "MomentCapture",
    "Oriented",
    "SecondMoment",
    "__version__",
    "adapter_parameters",
    "adapters",
    "allocate_ranks",
    "allocation_cost",
    "allocation_error",
    "attach_adapters",
    "basis_angles",
    "cache_path",
    "cached_capture",
    "calibration_batches",
    "capture_moments",
    "check_sufficient",
    "count_tokens",
    "damp",
    "default_model_path",
    "detach_adapters",
    "disable_adapters",
    "export_lora_delta",
    "estimate_memory",
    "export_peft",
    "find_blocks",
    "find_targets",
    "functional_error",
    "identity_error",
    "init_adapters",
    "iter_block_moments",
    "layer_angles",
    "layer_spectra",
    "load_adapters",
    "load_default_model",
    "load_model",
    "load_moments",
    "model_identity",
    "optimal_ranks",
    "orient",
    "passages",
    "principal_angles",
    "prompt_batches",
    "quad",
    "rank_costs",
    "read_texts",
    "save_adapters",
    "save_moments",
    "split_half",
    "text_batches",
    "trainable_parameters",
    "weight_matrix",
]
