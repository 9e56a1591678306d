"""Stage 3, algebra (pure tensors, no modules or hooks): damping, SVDs, orientation under a metric, the
measures, Cayley rotations and the rank-allocation dynamic programme."""

from .budget import (
    allocation_cost,
    allocation_error,
    allocation_tolerance,
    dropped_energy,
    optimal_ranks,
    rank_costs,
    ranks_at_tolerance,
    threshold_ranks,
    tolerance_ranks,
)
from .damping import DEFAULT_EPS, DEFAULT_EPS_MODE, Damped, damp
from .loftq import QuantizedResidual, quantize_residual
from .measures import functional_error, functional_reference, identity_error, principal_angles, quad
from .orient import METRICS, Oriented, orient
from .quant import QUANTS, FourBit, Int8, Quantized, Quantizer, quantizer

__all__ = [
    "DEFAULT_EPS",
    "QUANTS",
    "FourBit",
    "Int8",
    "Quantized",
    "QuantizedResidual",
    "Quantizer",
    "quantize_residual",
    "quantizer",
    "DEFAULT_EPS_MODE",
    "METRICS",
    "Damped",
    "Oriented",
    "allocation_cost",
    "allocation_error",
    "allocation_tolerance",
    "damp",
    "dropped_energy",
    "functional_error",
    "functional_reference",
    "identity_error",
    "optimal_ranks",
    "orient",
    "principal_angles",
    "quad",
    "rank_costs",
    "ranks_at_tolerance",
    "threshold_ranks",
    "tolerance_ranks",
]
