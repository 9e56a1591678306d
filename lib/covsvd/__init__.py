"""covsvd: covariance-oriented SVD initialisation of adapters, exactly.

    import covsvd
    model, tokenizer = covsvd.load_default_model()          # embedded all-MiniLM-L6-v2, offline
    batches = covsvd.calibration_batches(tokenizer)          # pydoc_data.topics, train split
    moments = covsvd.capture_moments(model, batches)         # {module name: SecondMoment}
    report = covsvd.attach_adapters(model, moments, r=64)    # metric="full": the data metric's optimum

The package is the pipeline, one folder a stage, a lower stage never importing a higher one:
``covsvd.data`` (text -> batches, models, targets, fingerprints) -> ``covsvd.capture`` (second moments) ->
``covsvd.algebra`` (pure tensors: damping, orientation, measures, allocation) -> ``covsvd.adapt`` (adapters on a
model) -> ``covsvd.export`` (peft), with the CLI on top (``covsvd.cli``) and the research lab beside
(``covsvd.lab``: notebooks, sweeps, plotting; never imported by the rest). The most used names are here; every
public name is in its stage's ``__all__``. The algebra is docs/algebra.md.
"""

from .adapt import (
    AttachReport,
    BoundedGainLinear,
    InsufficientCalibrationWarning,
    adapters,
    allocate_ranks,
    attach_adapters,
    check_sufficient,
    detach_adapters,
    disable_adapters,
    init_adapters,
    layer_angles,
    load_adapters,
    save_adapters,
    split_half,
    trainable_parameters,
)
from .algebra import (
    DEFAULT_EPS,
    METRICS,
    Oriented,
    functional_error,
    identity_error,
    orient,
    principal_angles,
    quantize_residual,
)
from .capture import (
    SecondMoment,
    cached_capture,
    capture_moments,
    capture_output_moments,
    estimate_memory,
    iter_block_moments,
    load_moments,
    save_moments,
)
from .data import (
    calibration_batches,
    count_tokens,
    find_targets,
    load_default_model,
    load_model,
    prompt_batches,
    read_texts,
    text_batches,
    weight_matrix,
)
from .export import export_lora_delta, export_peft
from .version import __version__

__all__ = [
    "DEFAULT_EPS",
    "METRICS",
    "AttachReport",
    "BoundedGainLinear",
    "InsufficientCalibrationWarning",
    "Oriented",
    "SecondMoment",
    "__version__",
    "adapters",
    "allocate_ranks",
    "attach_adapters",
    "cached_capture",
    "calibration_batches",
    "capture_moments",
    "capture_output_moments",
    "check_sufficient",
    "count_tokens",
    "detach_adapters",
    "disable_adapters",
    "estimate_memory",
    "export_lora_delta",
    "export_peft",
    "find_targets",
    "functional_error",
    "identity_error",
    "init_adapters",
    "iter_block_moments",
    "layer_angles",
    "load_adapters",
    "load_default_model",
    "load_model",
    "load_moments",
    "orient",
    "principal_angles",
    "prompt_batches",
    "quantize_residual",
    "read_texts",
    "save_adapters",
    "save_moments",
    "split_half",
    "text_batches",
    "trainable_parameters",
    "weight_matrix",
]
