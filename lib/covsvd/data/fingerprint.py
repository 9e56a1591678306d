"""Which model, and which *weights*: the one identity every moment file, resume directory, adapter file and
export is checked against.

:func:`model_identity` returns a small JSON-able dict:

* ``fingerprint``: 16 hex digits over every parameter's name and shape (the architecture);
* ``weights``: 16 hex digits over every parameter's name, shape, dtype and up to :data:`SAMPLES` of its values
  at evenly spaced positions (:func:`covsvd.util.digest.sampled_digest`): cheap (O(parameters x samples) reads,
  whatever the model's size) and enough to tell a fine-tune from its base;
* ``name_or_path`` and ``model_type``, for messages only (never compared).

:func:`check_same_model` is the single comparison: architecture first, then weights. A deliberate override
(moments captured on a base, used on its fine-tune) is ``check_weights=False`` at the call that meets them,
which still compares the architecture.
"""

from __future__ import annotations

from torch import nn

from ..util.digest import json_digest, sampled_digest

#: Values read per parameter for the ``weights`` digest.
SAMPLES = 256


def model_identity(model: nn.Module) -> dict[str, str]:
    """``{"name_or_path", "model_type", "fingerprint", "weights"}`` of ``model`` (module doc).

    Parameters on the meta device contribute their name, shape and dtype only (they hold no values).
    """
    arch, weights = [], []
    for name, p in model.named_parameters():
        arch.append((name, list(p.shape)))
        weights.append((name, "meta" if p.is_meta else sampled_digest(p, SAMPLES)))
    config = getattr(model, "config", None)
    return {
        "name_or_path": str(getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "")),
        "model_type": str(getattr(config, "model_type", type(model).__name__)),
        "fingerprint": json_digest(arch, 16),
        "weights": json_digest(weights, 16),
    }


def describe(identity: dict | None) -> str:
    """``"llama './ckpt' (architecture 0123..., weights 4567...)"``, for error messages."""
    if not identity:
        return "an unrecorded model"
    return (f"{identity.get('model_type', '?')} {identity.get('name_or_path', '')!r} (architecture "
            f"{identity.get('fingerprint')}, weights {identity.get('weights', 'unrecorded')})")


def check_same_model(recorded: dict | None, current: dict, what: str, fix: str, check_weights: bool = True) -> None:
    """Raise ``ValueError`` unless ``recorded`` (an identity stored with ``what``) is ``current``'s model.

    Compares the architecture fingerprint, then (``check_weights``) the weights digest. ``recorded`` ``None``
    (nothing was recorded) raises too: it cannot be checked. The message names both models, ``what`` and
    ``fix``, and the override when only the weights differ.
    """
    if not recorded:
        raise ValueError(f"{what} records no model identity, so it cannot be checked against "
                         f"{describe(current)}: {fix}")
    if recorded.get("fingerprint") != current["fingerprint"]:
        raise ValueError(f"{what} comes from a different model: {describe(recorded)}, not {describe(current)}: {fix}")
    if check_weights and recorded.get("weights") != current["weights"]:
        raise ValueError(
            f"{what} comes from other weights of the same architecture (a fine-tune or another checkpoint): "
            f"{describe(recorded)}, this model {describe(current)}: {fix}; to use them on these weights "
            "deliberately, pass check_weights=False")
