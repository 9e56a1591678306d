"""Saving and loading attached adapters: one safetensors file (no pickle), written atomically.

Tensors are named ``"{module}.{U,S,P,W_res,bias,g,rot_V.theta,rot_U.theta}"``; the JSON metadata describes
the model (:func:`covsvd.data.fingerprint.model_identity` of the plain model), the targets and every setting,
so that a file from another model, other weights, other targets or other shapes raises on load instead of
loading wrong numbers.

What a file holds (``contents``): ``"adapters"`` (the default: what the adapters add, ``U, S, P`` and the
trainable ``g`` and rotations; ``W_res`` is formed again from the base weight on load, exactly as
:func:`covsvd.orient` forms it, after the base's digest is checked), ``"full"`` (also ``W_res`` and the bias:
the size of the targets' weights) or ``"trainable"`` (``g`` and rotations only, for a model that carries the
very same adapters).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..algebra.orient import residual
from ..data.fingerprint import check_same_model
from ..data.targets import find_targets, in_out_features, weight_matrix
from ..util.checks import check_choice
from ..util.digest import sampled_digest, tensors_digest
from ..util.files import atomic_write
from ..version import __version__
from .attach import layout
from .layer import BoundedGainLinear
from .plan import shape_str
from .registry import adapters, attached_identity, install

FORMAT = "covsvd.adapters"
FORMAT_VERSION = "1"


def frozen_digest(m: BoundedGainLinear) -> str:
    """16 hex digits over an adapter's frozen factors (all of U, S, P): a trainable-only file must fit them."""
    return tensors_digest({"U": m.U, "S": m.S, "P": m.P})[:16]


def _layer_meta(m: BoundedGainLinear) -> dict:
    return dict(d_out=m.out_features, d_in=m.in_features, r=m.r, layout=m.layout,
                base_dtype=str(m.base_dtype).removeprefix("torch."), coeff=m.coeff, rotate=m.rotate,
                block_size=m.block_size, max_angle=m.max_angle, has_bias=m.bias is not None,
                frozen_digest=frozen_digest(m), **m.config)


#: What :func:`save_adapters` can write (module doc).
CONTENTS = ("adapters", "full", "trainable")


def _kept(key: str, contents: str) -> bool:
    """Whether the adapter tensor ``key`` goes into a file of ``contents``."""
    trainable = key == "g" or key.endswith(".theta")
    return contents == "full" or trainable or (contents == "adapters" and key not in ("W_res", "bias"))


def save_adapters(model: nn.Module, path: str | os.PathLike, contents: str = "adapters", *,
                  overwrite: bool = False) -> dict:
    """Write every adapter of ``model`` to one safetensors file; returns the metadata written.

    ``contents``: ``"adapters"`` (default), ``"full"`` or ``"trainable"`` (module doc). Metadata (JSON strings):
    format, covsvd version, the plain model's identity, and per layer its shapes and settings (metric, r, eps
    used, rotate, coeff, block_size, max_angle, storage dtype, digests, identity errors). Raises
    ``FileExistsError`` when ``path`` exists and ``overwrite`` is false, ``ValueError`` for a model without
    adapters or an unknown ``contents``; the file is written atomically.
    """
    from safetensors.torch import save_file

    check_choice("contents", contents, CONTENTS)
    found = adapters(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no covsvd adapters attached (nothing to save)")
    if Path(path).exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it, or choose another path")
    tensors = {}
    for name, m in found.items():
        for key, t in m.state_dict().items():
            if t is not None and _kept(key, contents):
                tensors[f"{name}.{key}"] = t.detach().contiguous().cpu()
    layers = {name: _layer_meta(m) for name, m in found.items()}
    common = {k: sorted({json.dumps(v[k]) for v in layers.values()}) for k in ("metric", "r", "eps", "rotate", "coeff")}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "covsvd_version": __version__,
        "contents": contents,
        "model_identity": json.dumps(attached_identity(model)),
        "targets": json.dumps(list(found)),
        "layers": json.dumps(layers),
        **{k: (json.loads(v[0]) if len(v) == 1 else "mixed") for k, v in common.items()},
    }
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return meta


def _read(path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a covsvd adapter file (metadata format={meta.get('format')!r}); "
                             "write one with covsvd.save_adapters(path, model)")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: adapter file format version {meta.get('format_version')!r}, this "
                             f"covsvd reads {FORMAT_VERSION!r}")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return meta, tensors


_SETTINGS = ("d_out", "d_in", "r", "layout", "rotate", "block_size", "max_angle", "coeff", "has_bias")


def load_adapters(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a :func:`save_adapters` file into ``model``; returns the layer names loaded.

    * an ``"adapters"`` or ``"full"`` file onto a plain model: rebuilds and installs the adapters (no moments
      needed; ``W_res`` from the file, or formed again from the base weight), freezing the rest as
      :func:`covsvd.attach_adapters` does;
    * such a file onto a model with the same adapters attached: overwrites the tensors the file holds;
    * a ``"trainable"`` file: the model must already carry adapters with the same frozen factors
      (checked by digest); only ``g`` and the rotations are overwritten.

    Everything is checked before anything changes: the model's identity (architecture and weights
    fingerprints, :func:`covsvd.data.fingerprint.check_same_model`), the target set, every shape and setting,
    and a digest of each original weight. Raises ``ValueError`` naming the mismatch.
    """
    meta, tensors = _read(path)
    layers: dict[str, dict] = json.loads(meta["layers"])
    check_same_model(json.loads(meta["model_identity"]), attached_identity(model), f"the adapters in {path}",
                     "load them into the model they were attached to")
    contents = meta.get("contents")
    attached = adapters(model)
    if attached or contents == "trainable":
        return _load_into_attached(path, attached, layers, tensors, contents)
    built = {name: _rebuild(path, model, name, layers[name], tensors) for name in find_targets(model, list(layers))}
    install(model, built, attached_identity(model))
    return list(built)


def _load_into_attached(path, attached: dict, layers: dict, tensors: dict, contents: str) -> list[str]:
    """Overwrite the attached adapters' tensors that the file holds, after checking every layer's settings."""
    if set(attached) != set(layers):
        raise ValueError(f"{path} holds adapters for {len(layers)} layers, the model has {len(attached)} "
                         f"attached; only in file: {sorted(set(layers) - set(attached))[:5]}, only in model: "
                         f"{sorted(set(attached) - set(layers))[:5]}"
                         + ("; a trainable-only file needs the same adapters attached first"
                            if contents == "trainable" else "; detach_adapters(model) first"))
    for name, m in attached.items():
        here, there = _layer_meta(m), layers[name]
        diff = {k: (there.get(k), here.get(k)) for k in _SETTINGS + ("base_digest",) if there.get(k) != here.get(k)}
        if contents == "trainable" and there.get("frozen_digest") != here["frozen_digest"]:
            diff["frozen_digest"] = (there.get("frozen_digest"), here["frozen_digest"])
        if diff:
            raise ValueError(f"{path}: layer {name!r} does not match the attached adapter (file, model): {diff}")
    own = {f"{name}.{k}": t for name, m in attached.items() for k, t in m.state_dict().items()
           if t is not None and _kept(k, contents)}
    _check_tensors(path, tensors, own)
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(tensors[k])
    return list(attached)


def _rebuild(path, model: nn.Module, name: str, lm: dict, tensors: dict) -> BoundedGainLinear:
    """The adapter of layer ``name`` from the file (``lm``: its metadata), checked against the plain module."""
    module = model.get_submodule(name)
    d_out, d_in = in_out_features(module)
    W = weight_matrix(module).detach()
    got = dict(d_out=d_out, d_in=d_in, layout=layout(module), base_digest=sampled_digest(module.weight))
    diff = {k: (lm.get(k), v) for k, v in got.items() if lm.get(k) != v}
    if diff:
        raise ValueError(f"{path}: layer {name!r} ({shape_str(module)}) does not match the file "
                         f"(file, model): {diff}; the file was saved from other weights or shapes")
    t = {k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".")}
    full = "W_res" in t
    want = ["U", "S", "P", "g"] + (["W_res"] + ["bias"] * lm["has_bias"]) * full
    want += ["rot_V.theta"] * (lm["rotate"] in ("V", "both")) + ["rot_U.theta"] * (lm["rotate"] in ("U", "both"))
    missing = [k for k in want if k not in t]
    if missing:
        raise ValueError(f"{path}: layer {name!r} lacks tensors {missing}")
    dev = W.device
    U, S, P = (t[k].to(dev) for k in ("U", "S", "P"))
    W_res = t["W_res"].to(dev) if full else residual(W, U, S, P, U.dtype)[3]
    bias = (t["bias"].to(dev) if full else getattr(module, "bias", None)) if lm["has_bias"] else None
    config = {k: v for k, v in lm.items() if k not in _SETTINGS + ("base_dtype", "frozen_digest")}
    adapter = BoundedGainLinear(U, S, P, W_res, bias, coeff=lm["coeff"], rotate=lm["rotate"],
                                block_size=lm["block_size"], max_angle=lm["max_angle"], layout=lm["layout"],
                                base_dtype=W.dtype, config=config)
    own = {f"{name}.{k}": v for k, v in adapter.state_dict().items() if k in t}
    _check_tensors(path, {k: v for k, v in tensors.items() if k.startswith(name + ".")}, own)
    with torch.no_grad():
        adapter.g.copy_(t["g"])
        for arm in ("rot_V", "rot_U"):
            if getattr(adapter, arm) is not None:
                getattr(adapter, arm).theta.copy_(t[f"{arm}.theta"])
    adapter.train(module.training)
    return adapter


def _check_tensors(path, tensors: dict, own: dict) -> None:
    for k, t in own.items():
        if k not in tensors:
            raise ValueError(f"{path}: tensor {k!r} missing from the file")
        if tuple(tensors[k].shape) != tuple(t.shape) or tensors[k].dtype != t.dtype:
            raise ValueError(f"{path}: tensor {k!r} is {tuple(tensors[k].shape)} {tensors[k].dtype} in the file, "
                             f"{tuple(t.shape)} {t.dtype} in the model")
