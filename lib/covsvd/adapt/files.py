"""Saving and loading attached adapters: one safetensors file (no pickle), written atomically.

Tensors are named ``"{module}.{U,S,P,W_res,bias,g,rot_V.theta,rot_U.theta}"``; the JSON metadata describes
the model (:func:`covsvd.model_identity` of the plain model), the targets and every setting, so that a file
from another model, other targets or other shapes raises on load instead of loading wrong numbers.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..data.targets import find_targets, in_out_features, weight_matrix
from ..util.digest import sampled_digest, tensors_digest
from ..util.files import atomic_write
from ..version import __version__
from .attach import adapters, attached_identity, install, layout, shape_str
from .layer import BoundedGainLinear

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


def save_adapters(path: str | os.PathLike, model: nn.Module, trainable_only: bool = False) -> dict:
    """Write every adapter of ``model`` to one safetensors file; returns the metadata written.

    Tensors are named ``"{module}.{U,S,P,W_res,bias,g,rot_V.theta,rot_U.theta}"``. ``trainable_only=True``
    writes only ``g`` and the rotation parameters (tiny; loadable into a model whose adapters were
    attached with the very same frozen factors, which the file's digests check). Metadata (JSON strings):
    format, covsvd version, ``model_identity`` of the plain model, and per layer its shapes and settings
    (metric, r, eps used, rotate, coeff, block_size, max_angle, storage dtype, digests, identity errors).
    """
    from safetensors.torch import save_file

    found = adapters(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no covsvd adapters attached (nothing to save)")
    tensors = {}
    for name, m in found.items():
        state = m.state_dict()
        for key, t in state.items():
            if trainable_only and not (key == "g" or key.endswith(".theta")):
                continue
            if t is not None:
                tensors[f"{name}.{key}"] = t.detach().contiguous().cpu()
    layers = {name: _layer_meta(m) for name, m in found.items()}
    common = {k: sorted({json.dumps(v[k]) for v in layers.values()}) for k in ("metric", "r", "eps", "rotate", "coeff")}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "covsvd_version": __version__,
        "contents": "trainable" if trainable_only else "full",
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


def load_adapters(path: str | os.PathLike, model: nn.Module) -> list[str]:
    """Load a :func:`save_adapters` file into ``model``; returns the layer names loaded.

    * a ``"full"`` file onto a plain model: rebuilds and installs the adapters (no moments needed),
      freezing the rest as :func:`attach_adapters` does;
    * a ``"full"`` file onto a model with the same adapters attached: overwrites all their tensors;
    * a ``"trainable"`` file: the model must already carry adapters with the same frozen factors
      (checked by digest); only ``g`` and the rotations are overwritten.

    Everything is checked before anything changes: the model identity (architecture fingerprint),
    the target set, every shape and setting, and a digest of each original weight (so a file saved
    from another checkpoint of the same architecture raises too).
    """
    meta, tensors = _read(path)
    layers: dict[str, dict] = json.loads(meta["layers"])
    file_id = json.loads(meta["model_identity"])
    attached = adapters(model)
    here_id = attached_identity(model)
    if file_id.get("fingerprint") != here_id.get("fingerprint"):
        raise ValueError(f"{path} was saved from another model ({file_id.get('model_type')} "
                         f"{file_id.get('name_or_path')!r}, fingerprint {file_id.get('fingerprint')}); this one is "
                         f"{here_id.get('model_type')} {here_id.get('name_or_path')!r} (fingerprint "
                         f"{here_id.get('fingerprint')}); load it into the model it was trained on")
    contents = meta.get("contents")
    if attached or contents == "trainable":
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
                raise ValueError(f"{path}: layer {name!r} does not match the attached adapter "
                                 f"(file, model): {diff}")
        own = {f"{name}.{k}": t for name, m in attached.items() for k, t in m.state_dict().items()}
        keys = [k for k in own if contents == "full" or k.endswith(".g") or k.endswith(".theta")]
        _check_tensors(path, tensors, {k: own[k] for k in keys})
        with torch.no_grad():
            for k in keys:
                own[k].copy_(tensors[k])
        return list(attached)

    # a full file onto a plain model
    names = find_targets(model, list(layers))
    built = {}
    for name in names:
        module, lm = model.get_submodule(name), layers[name]
        d_out, d_in = in_out_features(module)
        W = weight_matrix(module)
        got = dict(d_out=d_out, d_in=d_in, layout=layout(module), base_digest=sampled_digest(module.weight))
        diff = {k: (lm.get(k), v) for k, v in got.items() if lm.get(k) != v}
        if diff:
            raise ValueError(f"{path}: layer {name!r} ({shape_str(module)}) does not match the file "
                             f"(file, model): {diff}; the file was saved from other weights or shapes")
        t = {k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".")}
        want = ["U", "S", "P", "W_res", "g"] + (["bias"] if lm["has_bias"] else [])
        want += ["rot_V.theta"] * (lm["rotate"] in ("V", "both")) + ["rot_U.theta"] * (lm["rotate"] in ("U", "both"))
        missing = [k for k in want if k not in t]
        if missing:
            raise ValueError(f"{path}: layer {name!r} lacks tensors {missing}")
        dev = W.device
        config = {k: v for k, v in lm.items() if k not in _SETTINGS + ("base_dtype", "frozen_digest")}
        adapter = BoundedGainLinear(
            t["U"].to(dev), t["S"].to(dev), t["P"].to(dev), t["W_res"].to(dev),
            t["bias"].to(dev) if lm["has_bias"] else None, coeff=lm["coeff"], rotate=lm["rotate"],
            block_size=lm["block_size"], max_angle=lm["max_angle"], layout=lm["layout"], base_dtype=W.dtype,
            config=config)
        _check_tensors(path, {k: v for k, v in tensors.items() if k.startswith(name + ".")},
                       {f"{name}.{k}": v for k, v in adapter.state_dict().items()})
        with torch.no_grad():
            adapter.g.copy_(t["g"])
            for arm in ("rot_V", "rot_U"):
                if getattr(adapter, arm) is not None:
                    getattr(adapter, arm).theta.copy_(t[f"{arm}.theta"])
        built[name] = adapter
    install(model, built, here_id)
    return names


def _check_tensors(path, tensors: dict, own: dict) -> None:
    for k, t in own.items():
        if k not in tensors:
            raise ValueError(f"{path}: tensor {k!r} missing from the file")
        if tuple(tensors[k].shape) != tuple(t.shape) or tensors[k].dtype != t.dtype:
            raise ValueError(f"{path}: tensor {k!r} is {tuple(tensors[k].shape)} {tensors[k].dtype} in the file, "
                             f"{tuple(t.shape)} {t.dtype} in the model")
