"""Stage 2, capture: the second moments ``C = E[x x^T]`` of the targets' inputs (hooked or one block at a
time), the output moments ``G = E[g g^T]`` of their output gradients, their files, cache and memory estimate."""

from .cache import cache_path, cached_capture
from .files import load_moments, save_moments
from .hooked import MomentCapture
from .layerwise import find_blocks, iter_block_moments
from .memory import MemoryEstimate, estimate_memory
from .moments import SecondMoment
from .options import CaptureOptions
from .output import OutputCapture, capture_output_moments
from .run import capture_moments

__all__ = [
    "CaptureOptions",
    "MemoryEstimate",
    "MomentCapture",
    "OutputCapture",
    "SecondMoment",
    "cache_path",
    "cached_capture",
    "capture_moments",
    "capture_output_moments",
    "estimate_memory",
    "find_blocks",
    "iter_block_moments",
    "load_moments",
    "save_moments",
]
