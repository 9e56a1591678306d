"""Saving and loading captured moments: one safetensors file (no pickle), written atomically.

Layout: for each distinct accumulator (targets sharing an input are stored once, under the first
name), the fp64 tensors ``"{name}.sum_xx"``, ``"{name}.sum_x"``, ``"{name}.sum_abs"`` and the int64
``"{name}.count"``. The string metadata holds JSON: the model identity (:func:`covsvd.model_identity`),
the name -> stored-name map, per-accumulator kind / d_in / count / precision, the token count, the
dtype, the package version, and a SHA-256 of the tensor bytes so a corrupt file is caught on load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..data.fingerprint import check_same_model, model_identity
from ..util.digest import tensors_digest
from ..util.files import atomic_write
from ..version import __version__
from .moments import SecondMoment

FORMAT = "covsvd.capture.moments"
FORMAT_VERSION = "1"
_FIELDS = ("sum_xx", "sum_x", "sum_abs", "count")


def _identity(moments: Mapping[str, SecondMoment], model, check_weights: bool) -> dict | None:
    known = {json.dumps(m.model, sort_keys=True) for m in moments.values() if m.model is not None}
    if model is not None:
        ident = model_identity(model)
        for recorded in sorted(known):
            check_same_model(json.loads(recorded), ident, "these moments",
                             "save them with the model they were captured on", check_weights)
        return ident
    if len(known) > 1:
        raise ValueError(f"these moments come from {len(known)} different models: {sorted(known)}")
    return json.loads(known.pop()) if known else None


def save_moments(moments: Mapping[str, SecondMoment], path: str | os.PathLike, model=None, *,
                 overwrite: bool = False, check_weights: bool = True) -> Path:
    """Write ``{name: SecondMoment}`` to ``path`` (safetensors), atomically (temp file + ``os.replace``).

    ``model``: optional; its identity is recorded (and must match the moments' own, if they have one:
    :func:`covsvd.data.fingerprint.check_same_model`, ``check_weights`` as there). Raises ``FileExistsError``
    when ``path`` exists and ``overwrite`` is false (checked before anything is written). Returns the path.
    """
    from safetensors.torch import save_file

    if not moments:
        raise ValueError("no moments to save: the dict is empty")
    for name, m in moments.items():
        if not isinstance(m, SecondMoment):
            raise TypeError(f"moments[{name!r}] is a {type(m).__name__}, not a SecondMoment")
    if Path(path).exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it, or choose another path")
    ident = _identity(moments, model, check_weights)
    stored: dict[int, str] = {}  # id(accumulator) -> stored name (first name that holds it)
    layers = {name: stored.setdefault(id(m), name) for name, m in moments.items()}
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, dict] = {}
    for name, m in moments.items():
        if layers[name] != name:
            continue
        for field in ("sum_xx", "sum_x", "sum_abs"):
            tensors[f"{name}.{field}"] = getattr(m, field).detach().to("cpu", torch.float64).contiguous()
        tensors[f"{name}.count"] = torch.tensor([m.count], dtype=torch.int64)
        groups[name] = {"kind": m.kind, "d_in": m.d_in, "count": m.count, "accumulate": m.accumulate}
    kinds = sorted({g["kind"] for g in groups.values()})
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "covsvd_version": __version__,
        "model": json.dumps(ident),
        "kind": kinds[0] if len(kinds) == 1 else "mixed",
        "dtype": "float64",
        "tokens": str(max(g["count"] for g in groups.values())),
        "layers": json.dumps(layers),
        "groups": json.dumps(groups),
        "sha256": tensors_digest(tensors),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a moments file, JSON fields decoded (no tensors read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    return _decode(path, meta)


def _decode(path, meta: dict) -> dict:
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a covsvd moments file (metadata format={meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has moments format version {meta.get('format_version')!r}; this covsvd reads {FORMAT_VERSION!r}"
        )
    try:
        out = dict(meta)
        for key in ("model", "layers", "groups"):
            out[key] = json.loads(meta[key])
        out["tokens"] = int(meta["tokens"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: corrupt covsvd moments metadata ({e!r})") from e
    return out


def load_moments(
    path: str | os.PathLike, model=None, device: torch.device | str = "cpu", *, check_weights: bool = True
) -> dict[str, SecondMoment]:
    """Read ``{name: SecondMoment}`` written by :func:`save_moments` (shared accumulators shared again).

    ``model``: when given, the file's recorded identity must be this model's: the same architecture and
    (``check_weights``) the same weights (:func:`covsvd.data.fingerprint.check_same_model`); otherwise
    ``ValueError`` naming both. A truncated or corrupt file raises ``ValueError``.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no moments file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    meta = _decode(path, raw_meta)
    if tensors_digest(tensors) != meta.get("sha256"):
        raise ValueError(f"{path} is corrupt: its tensors do not match the checksum stored when it was written")
    ident = meta["model"]
    if model is not None:
        check_same_model(ident, model_identity(model), f"the moments in {path}",
                         "capture moments on this model (covsvd.capture_moments)", check_weights)
    distinct: dict[str, SecondMoment] = {}
    try:
        for name, g in meta["groups"].items():
            distinct[name] = SecondMoment(
                g["kind"],
                tensors[f"{name}.sum_xx"].to(device),
                tensors[f"{name}.sum_x"].to(device),
                tensors[f"{name}.sum_abs"].to(device),
                int(tensors[f"{name}.count"][0]),
                ident,
                g["accumulate"],
            )
        return {name: distinct[stored] for name, stored in meta["layers"].items()}
    except (KeyError, ValueError, IndexError) as e:
        raise ValueError(f"{path}: corrupt covsvd moments file ({e!r})") from e
