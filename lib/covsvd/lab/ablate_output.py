"""The output moments of the sweep's two-sided arm (:mod:`covsvd.lab.ablate`): ``G = E[g g^T]`` of the targets'
output gradients, probe mode (:func:`covsvd.capture_output_moments`, ``L = <V, H>`` with ``V ~ N(0, I)``, one draw
per batch, seed :data:`OUTPUT_SEED`), on the same train-split batches as the input moments, cached beside them.

The sweep damps with an *absolute* eps (``AblationConfig.eps_mode``), which has no fixed meaning for G, whose scale
is that of the probe's gradients; :func:`unit_output` therefore scales each G to mean diagonal 1, so the same eps is
relative on the output side (``N = G + eps * mean(diag G) I``, up to the factor that leaves the optimum unchanged:
docs/algebra.md, "Damping").

The probe settings are fixed here, not in :class:`~covsvd.lab.arms.AblationConfig`: they define the two-sided arm
only, and adding them to the config would change the hash of every other arm's rows.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

#: How the two-sided arm's G is captured (module doc).
OUTPUT_MODE, OUTPUT_SEED = "probe", 0


def output_moments_for(model, tokenizer, config, cache_dir: str | os.PathLike | None,
                       progress: bool = True) -> tuple[dict, dict]:
    """Full output moments ``{target: SecondMoment}`` (``(d_out, d_out)`` fp64 sums) of ``config.targets`` on the
    calibration batches of :func:`covsvd.lab.ablate.moments_for`, read from / written to ``cache_dir`` (a file
    named after the input moments' cache key, so any change of model, weights, batches or targets gives a new
    one; ``None``: no cache). Returns ``(outputs, info)`` with ``info = {"path", "cached", "capture_s"}``.
    The file is checked to belong to this model's weights when read (:func:`covsvd.load_moments`)."""
    import covsvd
    from covsvd.capture import cache_path

    t0 = time.perf_counter()
    batches = covsvd.calibration_batches(tokenizer, split="train", seq_len=config.calib_seq_len,
                                         max_tokens=config.calib_tokens)
    path = None
    if cache_dir is not None:
        key = cache_path(model, batches, config.targets, cache_dir=cache_dir)
        path = Path(key).with_name(key.name.replace("moments-", f"output-{OUTPUT_MODE}{OUTPUT_SEED}-"))
    cached = path is not None and path.is_file()
    if cached:
        outputs = covsvd.load_moments(path, model)
    else:
        outputs = covsvd.capture_output_moments(model, batches, OUTPUT_MODE, targets=config.targets, kind="full",
                                                seed=OUTPUT_SEED, progress=progress)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            covsvd.save_moments(outputs, path, model=model)
    return outputs, dict(path=path, cached=cached, capture_s=time.perf_counter() - t0)


def unit_output(outputs: dict) -> dict:
    """``{name: E[g g^T] / mean(diag E[g g^T])}`` ``(d_out, d_out)`` fp64 tensors (module doc)."""
    return {n: G.matrix() / G.diag().mean() for n, G in outputs.items()}
