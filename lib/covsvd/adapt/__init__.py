"""Stage 4, adapters on a model: the plan (every target checked), attach / detach / init, the bounded-gain
layer, rank allocation, calibration sufficiency and adapter files."""

from .allocate import allocate_ranks, layer_spectra
from .attach import (
    adapter_parameters,
    attach_adapters,
    detach_adapters,
    disable_adapters,
    trainable_parameters,
)
from .files import load_adapters, save_adapters
from .init import init_adapters
from .layer import BoundedGainLinear
from .plan import Plan, plan_targets
from .registry import adapters
from .report import AttachReport
from .sufficiency import (
    InsufficientCalibrationWarning,
    basis_angles,
    check_sufficient,
    layer_angles,
    split_half,
)

__all__ = [
    "AttachReport",
    "BoundedGainLinear",
    "InsufficientCalibrationWarning",
    "Plan",
    "adapter_parameters",
    "adapters",
    "allocate_ranks",
    "attach_adapters",
    "basis_angles",
    "check_sufficient",
    "detach_adapters",
    "disable_adapters",
    "init_adapters",
    "layer_angles",
    "layer_spectra",
    "load_adapters",
    "plan_targets",
    "save_adapters",
    "split_half",
    "trainable_parameters",
]
