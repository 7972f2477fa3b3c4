#!/usr/bin/env python3
"""Export PyTorch reference modules as candle-fused checkpoints and goldens.

candle-fused reproduces three PyTorch modules built from a Linear layer and a
fused elementwise epilogue:

* ``SwishScale``       -- ``y = swish(x W^T + b) * scaling_factor``
* ``ScaleBatchNorm``   -- ``y = BatchNorm1d((x W^T + b) * scale)``
* ``SigmoidResidual``  -- ``z = x W^T + b;  y = sigmoid(z) * scaling_factor + z``

This script defines those modules (same parameter names as the originals) and
writes, for each model, a directory containing

``config.json``
    ``{"model": NAME, "in_features": N, "out_features": N, ...}`` plus
    ``scaling_factor`` (swish_scale, sigmoid_residual) or ``eps`` and
    ``momentum`` (scale_batchnorm; ``momentum`` may be ``null``, which means a
    cumulative moving average as in PyTorch).
``model.safetensors``
    The module's ``state_dict()`` with PyTorch's key names, in float32
    (``bn.num_batches_tracked`` stays a 0-dim int64 tensor).
``golden.safetensors`` (optional)
    Reference values computed in float64 from the float32 parameters:

    - ``x`` (float32, batch x in) and ``g`` (float32, batch x out), the input
      and the upstream gradient;
    - ``y.train`` / ``y.eval``: the module output in train / eval mode;
    - ``grad.train.x`` / ``grad.eval.x`` and ``grad.train.<param>`` /
      ``grad.eval.<param>``: gradients of ``(y * g).sum()``;
    - scale_batchnorm only: ``after_train.bn.running_mean``,
      ``after_train.bn.running_var`` and ``after_train.bn.num_batches_tracked``,
      the buffers after the single train-mode forward pass.

    Train mode and eval mode each start from the checkpoint's state, so the
    eval-mode values use the exported running statistics.

Usage
-----
Regenerate the small checkpoints shipped in ``models/``::

    python3 scripts/export.py

Export a freshly initialised model of custom size::

    python3 scripts/export.py --model scale_batchnorm \\
        --in-features 512 --out-features 256 --batch 64 \\
        --momentum none --eps 1e-5 --seed 3 --dir /tmp/my_bn

Export a module you trained yourself (from Python)::

    import sys; sys.path.insert(0, "scripts")
    from export import export_module
    export_module(my_module, "checkpoints/my_model", batch=32, seed=0)

``export_module`` accepts instances of the three classes (matched by class
name, so a copy of the class defined in your own training code works too) and
raises ``ValueError`` for anything else.  Pass ``golden=False`` to skip the
golden file (one already in the directory is then removed: it would describe
other weights).

Requires ``torch`` and ``safetensors``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from typing import Dict, Optional

import torch
import torch.nn as nn
from safetensors.torch import save_file


# ---------------------------------------------------------------------------
# The reference modules.  Parameter names and forward semantics match the
# original PyTorch definitions exactly.
# ---------------------------------------------------------------------------


class SwishScale(nn.Module):
    """Linear -> swish (x * sigmoid(x)) -> multiply by a constant."""

    def __init__(self, in_features, out_features, scaling_factor):
        super().__init__()
        self.matmul = nn.Linear(in_features, out_features)
        self.scaling_factor = scaling_factor

    def forward(self, x):
        x = self.matmul(x)
        x = x * torch.sigmoid(x)
        return x * self.scaling_factor


class ScaleBatchNorm(nn.Module):
    """Linear -> multiply by a learned per-feature scale -> BatchNorm1d."""

    def __init__(self, in_features, out_features, scale_shape, eps=1e-5, momentum=0.1):
        super().__init__()
        self.gemm = nn.Linear(in_features, out_features)
        self.scale = nn.Parameter(torch.randn(scale_shape))
        self.bn = nn.BatchNorm1d(out_features, eps=eps, momentum=momentum)

    def forward(self, x):
        x = self.gemm(x)
        x = x * self.scale
        return self.bn(x)


class SigmoidResidual(nn.Module):
    """Linear -> z + sigmoid(z) * scaling_factor."""

    def __init__(self, input_size, hidden_size, scaling_factor):
        super().__init__()
        self.gemm = nn.Linear(input_size, hidden_size)
        self.scaling_factor = scaling_factor

    def forward(self, x):
        x = self.gemm(x)
        original_x = x
        x = torch.sigmoid(x)
        x = x * self.scaling_factor
        return x + original_x


# Model name used in config.json -> class name.
MODEL_CLASSES = {
    "swish_scale": SwishScale,
    "scale_batchnorm": ScaleBatchNorm,
    "sigmoid_residual": SigmoidResidual,
}

# The checkpoints shipped in models/: deliberately small, odd sizes so that no
# dimension is a multiple of a tile or vector width.
DEFAULT_EXPORTS = [
    dict(model="swish_scale", in_features=37, out_features=29,
         scaling_factor=2.0, batch=13, seed=1),
    dict(model="scale_batchnorm", in_features=33, out_features=27,
         eps=1e-5, momentum=0.1, batch=19, seed=2),
    dict(model="sigmoid_residual", in_features=31, out_features=23,
         scaling_factor=2.0, batch=9, seed=3),
]


# ---------------------------------------------------------------------------
# Building modules
# ---------------------------------------------------------------------------


def build_module(model: str, in_features: int, out_features: int, *,
                 scaling_factor: float = 2.0, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, seed: int = 0) -> nn.Module:
    """Create a deterministically initialised float32 module.

    Linear layers use PyTorch's default initialisation and ``scale`` is
    ``randn`` as in the original, all drawn after ``torch.manual_seed(seed)``.
    For ``scale_batchnorm`` the BatchNorm affine parameters and running
    statistics are also randomised (see ``randomize_batchnorm``) so that the
    eval-mode path is not an identity.
    """
    if model not in MODEL_CLASSES:
        raise ValueError(f"unknown model {model!r}; expected one of {sorted(MODEL_CLASSES)}")
    torch.manual_seed(seed)
    if model == "swish_scale":
        module = SwishScale(in_features, out_features, float(scaling_factor))
    elif model == "sigmoid_residual":
        module = SigmoidResidual(in_features, out_features, float(scaling_factor))
    else:
        module = ScaleBatchNorm(in_features, out_features, (out_features,),
                                eps=float(eps), momentum=momentum)
        randomize_batchnorm(module.bn)
    return module.float()


@torch.no_grad()
def randomize_batchnorm(bn: nn.BatchNorm1d) -> None:
    """Give a BatchNorm layer non-trivial parameters and running statistics.

    Draws from the global RNG, so the result is fixed by the seed set before.
    """
    n = bn.num_features
    bn.weight.copy_(torch.empty(n).uniform_(0.5, 1.5))
    bn.bias.copy_(torch.randn(n) * 0.5)
    bn.running_mean.copy_(torch.randn(n) * 0.3)
    bn.running_var.copy_(torch.empty(n).uniform_(0.5, 2.0))
    bn.num_batches_tracked.fill_(7)


# ---------------------------------------------------------------------------
# Inspecting a module: model name and config
# ---------------------------------------------------------------------------


def model_name_of(module: nn.Module) -> str:
    """Map a module to its config.json model name, by class name."""
    cls_name = type(module).__name__
    for name, cls in MODEL_CLASSES.items():
        if isinstance(module, cls) or cls_name == cls.__name__:
            return name
    expected = ", ".join(cls.__name__ for cls in MODEL_CLASSES.values())
    raise ValueError(f"cannot export a {cls_name}: expected one of {expected}")


def _linear_of(module: nn.Module, model: str) -> nn.Linear:
    attr = "matmul" if model == "swish_scale" else "gemm"
    linear = getattr(module, attr, None)
    if not isinstance(linear, nn.Linear) or linear.bias is None:
        raise ValueError(f"{model}: expected attribute '{attr}' to be an nn.Linear with bias")
    return linear


def config_of(module: nn.Module) -> dict:
    """Infer the config.json contents from a module's attributes."""
    model = model_name_of(module)
    linear = _linear_of(module, model)
    config = {
        "model": model,
        "in_features": int(linear.in_features),
        "out_features": int(linear.out_features),
    }
    if model in ("swish_scale", "sigmoid_residual"):
        factor = getattr(module, "scaling_factor", None)
        if isinstance(factor, torch.Tensor):
            factor = factor.item()
        if not isinstance(factor, (int, float)):
            raise ValueError(f"{model}: 'scaling_factor' must be a number, got {factor!r}")
        config["scaling_factor"] = float(factor)
    else:
        out = linear.out_features
        scale = getattr(module, "scale", None)
        if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != (out,):
            shape = None if scale is None else tuple(scale.shape)
            raise ValueError(f"{model}: 'scale' must have shape ({out},), got {shape}")
        bn = getattr(module, "bn", None)
        if not isinstance(bn, nn.BatchNorm1d):
            raise ValueError(f"{model}: 'bn' must be an nn.BatchNorm1d")
        if bn.num_features != out or not bn.affine or not bn.track_running_stats:
            raise ValueError(f"{model}: 'bn' must have {out} features, affine=True "
                             "and track_running_stats=True")
        config["eps"] = float(bn.eps)
        # None selects PyTorch's cumulative moving average; exported as JSON null.
        config["momentum"] = None if bn.momentum is None else float(bn.momentum)
    return config


# ---------------------------------------------------------------------------
# Goldens
# ---------------------------------------------------------------------------


def make_inputs(batch: int, in_features: int, out_features: int, seed: int):
    """Deterministic float32 input ``x`` ~ U(-2, 2) and upstream gradient ``g`` ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, in_features, generator=gen, dtype=torch.float32) * 4.0 - 2.0
    g = torch.randn(batch, out_features, generator=gen, dtype=torch.float32)
    return x, g


def run_reference(module: nn.Module, x: torch.Tensor, g: torch.Tensor,
                  train: bool) -> Dict[str, torch.Tensor]:
    """One float64 forward/backward pass on a fresh copy of ``module``.

    Returns ``y``, ``grad.x``, ``grad.<param>`` for every trainable parameter
    and, for modules with BatchNorm in train mode, the updated buffers under
    ``after_train.<buffer>``.  The caller's module is left untouched.
    """
    ref = copy.deepcopy(module).double()  # int64 buffers stay int64
    ref.train(train)
    ref.zero_grad(set_to_none=True)
    x64 = x.detach().double().requires_grad_(True)
    y = ref(x64)
    (y * g.detach().double()).sum().backward()

    mode = "train" if train else "eval"
    out = {f"y.{mode}": y.detach(), f"grad.{mode}.x": x64.grad.detach()}
    for name, param in ref.named_parameters():
        if not param.requires_grad:
            continue
        # A parameter that does not influence the output has a zero gradient.
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        out[f"grad.{mode}.{name}"] = grad.detach()
    if train:
        for name, buf in ref.named_buffers():
            if name.startswith("bn."):
                out[f"after_train.{name}"] = buf.detach()
    return out


def compute_golden(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Dict[str, torch.Tensor]:
    """All golden tensors (see module docstring) for ``module`` on input ``x``."""
    golden = {"x": x.float(), "g": g.float()}
    golden.update(run_reference(module, x, g, train=True))
    golden.update(run_reference(module, x, g, train=False))
    return golden


# ---------------------------------------------------------------------------
# Writing files
# ---------------------------------------------------------------------------


def _save(tensors: Dict[str, torch.Tensor], path: str) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path)


def export_module(module: nn.Module, out_dir: str, *, batch: int = 16, seed: int = 0,
                  golden: bool = True) -> dict:
    """Write ``config.json``, ``model.safetensors`` and optionally ``golden.safetensors``.

    ``module`` is an instance of SwishScale, ScaleBatchNorm or SigmoidResidual
    (or a class of the same name with the same attributes).  Floating-point
    parameters and buffers are stored as float32; the golden is computed in
    float64 from exactly those float32 values, with inputs drawn from ``seed``.
    The module itself is not modified.  Returns the config dict.
    """
    config = config_of(module)
    if golden and config["model"] == "scale_batchnorm" and batch < 2:
        raise ValueError("scale_batchnorm needs batch >= 2 for a train-mode golden")

    # Work on a float32 CPU copy so the checkpoint and the golden agree bit for bit.
    module32 = copy.deepcopy(module).cpu().float()
    os.makedirs(out_dir, exist_ok=True)

    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")

    _save(module32.state_dict(), os.path.join(out_dir, "model.safetensors"))

    golden_path = os.path.join(out_dir, "golden.safetensors")
    if golden:
        x, g = make_inputs(batch, config["in_features"], config["out_features"], seed)
        _save(compute_golden(module32, x, g), golden_path)
    elif os.path.exists(golden_path):
        # A golden of what the directory held before would not describe these weights.
        os.remove(golden_path)
    return config


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _parse_momentum(text: str) -> Optional[float]:
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}")


def _default_models_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Export candle-fused reference checkpoints and goldens. "
                    "Without --model, regenerates the small checkpoints in models/.")
    parser.add_argument("--model", choices=sorted(MODEL_CLASSES),
                        help="export one freshly initialised model of custom size")
    parser.add_argument("--in-features", type=int, help="Linear input size")
    parser.add_argument("--out-features", type=int, help="Linear output size")
    parser.add_argument("--batch", type=int, default=16, help="golden batch size (default 16)")
    parser.add_argument("--scaling-factor", type=float, default=2.0,
                        help="swish_scale / sigmoid_residual constant (default 2.0)")
    parser.add_argument("--eps", type=float, default=1e-5, help="BatchNorm eps (default 1e-5)")
    parser.add_argument("--momentum", type=_parse_momentum, default=0.1,
                        help="BatchNorm momentum, or 'none' for a cumulative average (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")
    parser.add_argument("--no-golden", action="store_true", help="skip golden.safetensors")
    parser.add_argument("--dir", help="output directory (with --model), or the models/ "
                                      "directory to regenerate (without --model)")
    args = parser.parse_args(argv)

    if args.model is not None:
        missing = [flag for flag, value in (("--in-features", args.in_features),
                                            ("--out-features", args.out_features),
                                            ("--dir", args.dir)) if value is None]
        if missing:
            parser.error(f"--model requires {', '.join(missing)}")
        if args.in_features <= 0 or args.out_features <= 0 or args.batch <= 0:
            parser.error("sizes and --batch must be positive")
    elif args.in_features is not None or args.out_features is not None:
        parser.error("--in-features/--out-features need --model")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    if args.model is not None:
        module = build_module(args.model, args.in_features, args.out_features,
                              scaling_factor=args.scaling_factor, eps=args.eps,
                              momentum=args.momentum, seed=args.seed)
        # Inputs use a seed distinct from the one used for the weights.
        config = export_module(module, args.dir, batch=args.batch, seed=args.seed + 1000,
                               golden=not args.no_golden)
        print(f"wrote {args.dir}: {json.dumps(config)}")
        return 0

    models_dir = args.dir or _default_models_dir()
    for spec in DEFAULT_EXPORTS:
        spec = dict(spec)
        name, batch, seed = spec.pop("model"), spec.pop("batch"), spec.pop("seed")
        in_f, out_f = spec.pop("in_features"), spec.pop("out_features")
        module = build_module(name, in_f, out_f, seed=seed, **spec)
        out_dir = os.path.join(models_dir, name)
        config = export_module(module, out_dir, batch=batch, seed=seed + 1000,
                               golden=not args.no_golden)
        print(f"wrote {out_dir}: {json.dumps(config)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
