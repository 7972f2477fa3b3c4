#!/usr/bin/env python3
"""Load a candle-fused checkpoint directory into the PyTorch reference module.

A checkpoint directory holds ``config.json`` and ``model.safetensors`` (as
written by the crate or by ``scripts/export.py``), or instead of the latter the
shards that ``model.safetensors.index.json`` names, as the crate reads them.
This script

1. validates ``config.json`` (with the crate's defaults: ``eps`` 1e-5 and
   ``momentum`` 0.1 for scale_batchnorm) and builds the matching PyTorch module
   (SwishScale, ScaleBatchNorm or SigmoidResidual, defined in ``export.py``);
2. checks that the weights have exactly the module's state_dict keys, with the
   right shapes and dtypes (any float dtype for the floats, converted to the
   module's float32), and finite values;
3. loads it with ``load_state_dict(strict=True)`` and prints a summary;
4. with ``--golden FILE``, recomputes every tensor of that golden file from the
   loaded module (float64, train and eval mode, gradients, BatchNorm buffers)
   and compares within tolerances.

It exits with status 0 when everything matches and 1 otherwise.

Usage::

    python3 scripts/load_checkpoint.py models/scale_batchnorm
    python3 scripts/load_checkpoint.py /tmp/ckpt --golden models/scale_batchnorm/golden.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
from safetensors.torch import load_file

# export.py sits next to this script; importing it should not leave a __pycache__ behind.
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export import MODEL_CLASSES, compute_golden, config_of  # noqa: E402


class CheckpointError(Exception):
    """Raised when a checkpoint does not match what the PyTorch module expects."""


def read_config(ckpt_dir: str) -> dict:
    """Read and validate config.json."""
    path = os.path.join(ckpt_dir, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")

    model = config.get("model")
    if model not in MODEL_CLASSES:
        raise CheckpointError(f"{path}: unknown model {model!r}, expected one of {sorted(MODEL_CLASSES)}")
    for key in ("in_features", "out_features"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(f"{path}: '{key}' must be a positive integer, got {value!r}")
    if model == "scale_batchnorm":
        config.setdefault("eps", 1e-5)
        config.setdefault("momentum", 0.1)
        if not _is_number(config.get("eps")) or config["eps"] <= 0:
            raise CheckpointError(f"{path}: 'eps' must be a positive number")
        if config["momentum"] is not None and not _is_number(config["momentum"]):
            raise CheckpointError(f"{path}: 'momentum' must be a number or null")
    elif not _is_number(config.get("scaling_factor")):
        raise CheckpointError(f"{path}: 'scaling_factor' must be a number")
    return config


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def build_from_config(config: dict) -> torch.nn.Module:
    """Instantiate the PyTorch module described by a config dict."""
    cls = MODEL_CLASSES[config["model"]]
    n_in, n_out = config["in_features"], config["out_features"]
    if config["model"] == "scale_batchnorm":
        momentum = config["momentum"]
        return cls(n_in, n_out, (n_out,), eps=float(config["eps"]),
                   momentum=None if momentum is None else float(momentum))
    return cls(n_in, n_out, float(config["scaling_factor"]))


def read_weights(ckpt_dir: str) -> tuple[str, dict]:
    """The weights' path and tensors: ``model.safetensors``, or the shards of its index."""
    path = os.path.join(ckpt_dir, "model.safetensors")
    index = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if os.path.exists(path) or not os.path.exists(index):
        try:
            return path, load_file(path)
        except Exception as err:  # safetensors raises several error types
            raise CheckpointError(f"cannot read {path}: {err}")
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        state = {}
        for shard in sorted(set(weight_map.values())):
            tensors = load_file(os.path.join(ckpt_dir, shard))
            for name, tensor in tensors.items():
                if weight_map.get(name) != shard:
                    raise CheckpointError(f"{index}: {shard} holds {name!r}, which the index does not give it")
                state[name] = tensor
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"cannot read {index} and its shards: {err}")
    return index, state


def load_checkpoint(ckpt_dir: str) -> torch.nn.Module:
    """Build the module from ``ckpt_dir`` and load its weights strictly."""
    config = read_config(ckpt_dir)
    module = build_from_config(config)
    path, state = read_weights(ckpt_dir)

    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing keys {missing}, unexpected keys {unexpected}")

    problems = []
    for name, ref in expected.items():
        tensor = state[name]
        if tuple(tensor.shape) != tuple(ref.shape):
            problems.append(f"{name}: shape {tuple(tensor.shape)}, expected {tuple(ref.shape)}")
        elif ref.is_floating_point():
            if not tensor.is_floating_point():
                problems.append(f"{name}: dtype {tensor.dtype}, expected a float dtype")
            elif not torch.isfinite(tensor).all():
                problems.append(f"{name}: contains non-finite values")
        elif tensor.dtype != ref.dtype:
            problems.append(f"{name}: dtype {tensor.dtype}, expected {ref.dtype}")
    if "bn.running_var" in state and (state["bn.running_var"] < 0).any():
        problems.append("bn.running_var: contains negative values")
    if "bn.num_batches_tracked" in state and state["bn.num_batches_tracked"].item() < 0:
        problems.append("bn.num_batches_tracked: negative")
    if problems:
        raise CheckpointError(f"{path}:\n  " + "\n  ".join(problems))

    # Floats in the module's dtype (load_state_dict would convert them too, but say so here).
    state = {name: t.to(expected[name].dtype) if t.is_floating_point() else t for name, t in state.items()}
    module.load_state_dict(state, strict=True)

    # The config the exporter would infer from the loaded module must agree.
    inferred = config_of(module)
    for key, value in inferred.items():
        if config.get(key) != value and not (_is_number(value) and _is_number(config.get(key))
                                             and float(config[key]) == value):
            raise CheckpointError(f"config.json: '{key}' is {config.get(key)!r}, module has {value!r}")
    return module


def compare_golden(module: torch.nn.Module, golden_path: str, rtol: float, atol: float) -> bool:
    """Recompute every tensor in ``golden_path`` from ``module`` and compare."""
    golden = load_file(golden_path)
    if "x" not in golden or "g" not in golden:
        raise CheckpointError(f"{golden_path}: needs tensors 'x' and 'g'")
    x, g = golden["x"], golden["g"]
    config = config_of(module)
    if tuple(x.shape[1:]) != (config["in_features"],) or tuple(g.shape) != (x.shape[0], config["out_features"]):
        raise CheckpointError(f"{golden_path}: x {tuple(x.shape)} / g {tuple(g.shape)} do not fit "
                              f"in={config['in_features']} out={config['out_features']}")

    ours = compute_golden(module, x, g)
    ok = True
    for name in sorted(golden):
        if name in ("x", "g"):
            continue
        if name not in ours:
            print(f"  {name:36s} MISSING (not produced by this model)")
            ok = False
            continue
        expected, actual = golden[name], ours[name]
        if tuple(expected.shape) != tuple(actual.shape):
            print(f"  {name:36s} SHAPE {tuple(actual.shape)} vs {tuple(expected.shape)}")
            ok = False
            continue
        if not expected.is_floating_point():
            match = torch.equal(expected, actual.to(expected.dtype))
            print(f"  {name:36s} {'ok' if match else 'MISMATCH'} "
                  f"({actual.item() if actual.dim() == 0 else '...'} vs "
                  f"{expected.item() if expected.dim() == 0 else '...'})")
            ok &= match
            continue
        e, a = expected.double(), actual.double()
        diff = (a - e).abs()
        max_abs = diff.max().item() if diff.numel() else 0.0
        match = bool(torch.allclose(a, e, rtol=rtol, atol=atol))
        print(f"  {name:36s} {'ok' if match else 'MISMATCH'}  max |diff| = {max_abs:.3e}")
        ok &= match
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Load a candle-fused checkpoint into PyTorch and validate it.")
    parser.add_argument("dir", help="checkpoint directory (config.json + model.safetensors)")
    parser.add_argument("--golden", help="golden.safetensors to compare a recomputed forward/backward against")
    parser.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance (default 1e-5)")
    parser.add_argument("--atol", type=float, default=1e-6, help="absolute tolerance (default 1e-6)")
    args = parser.parse_args(argv)

    try:
        module = load_checkpoint(args.dir)
        print(f"loaded {args.dir}: {json.dumps(config_of(module))}")
        for name, tensor in module.state_dict().items():
            stats = ""
            if tensor.is_floating_point():
                stats = f"mean {tensor.mean().item():+.4f}  std {tensor.std().item() if tensor.numel() > 1 else 0.0:.4f}"
            else:
                stats = f"value {tensor.item()}" if tensor.dim() == 0 else ""
            print(f"  {name:24s} {str(tuple(tensor.shape)):10s} {str(tensor.dtype):14s} {stats}")
        if args.golden:
            print(f"comparing against {args.golden} (rtol {args.rtol}, atol {args.atol}):")
            if not compare_golden(module, args.golden, args.rtol, args.atol):
                print("FAILED: golden mismatch")
                return 1
        print("OK")
        return 0
    except CheckpointError as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:  # e.g. load_state_dict errors
        print(f"FAILED: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
