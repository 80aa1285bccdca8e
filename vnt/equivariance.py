"""Equivariance as a measured number (cf. e3nn's ``equivariance_error``).

For a model f with coordinate output and optional invariant feature output, and Haar-random
rotations R (and optionally a random translation t_b per sample b):

    err = max over rotations of | f(x R^T + t) - (f(x) R^T + t') |

where t' = t if the model is translation equivariant, else 0, and feature outputs are compared
to themselves unrotated. Input and output transforms are done in float64; the model runs in its
own dtype (or under autocast, if the caller wraps the call). Only valid (unmasked) points count.
``rel`` divides by the largest absolute value of the expected output, so it is scale free.

``rounding_floor`` measures how much of a low-precision error the function itself forces: the
error of the same weights run in float64 when only the inputs (and, optionally, every VN block's
output) are rounded to the low precision. An implementation that computed the function exactly
from float32 inputs would still show the input-rounding floor; one that stores its activations in
float32 (all practical ones) would still show about the activation-rounding floor.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from vnt import layers
from vnt.rotations import random_rotations

__all__ = ["EquivarianceError", "equivariance_error", "keyword_call", "rounding_floor", "DTYPE_TOLERANCES"]

# relative-error tolerances by dtype for equivariance tests (bias_epsilon = 0)
DTYPE_TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 5e-2}


@dataclass(frozen=True)
class EquivarianceError:
    rel: float
    abs: float
    num_rotations: int


def _split(out):
    return (out[0], out[1]) if isinstance(out, tuple) else (out, None)


def keyword_call(model, coors: Tensor, feats: Tensor | None, mask: Tensor | None):
    """The default call: ``model(coors, feats=feats, mask=mask)`` (VNTransformer, the original's)."""
    return model(coors, feats=feats, mask=mask)


def equivariance_error(model, coors: Tensor, *, feats: Tensor | None = None, mask: Tensor | None = None,
                       num_rotations: int = 4, translate: bool = False, translation_scale: float = 10.0,
                       output_translates: bool | None = None, autocast_dtype: torch.dtype | None = None,
                       input_dtype: torch.dtype | None = None, generator: torch.Generator | None = None,
                       call=keyword_call) -> EquivarianceError:
    """Max relative and absolute error of ``model`` under ``num_rotations`` random rotations.

    model: a module; ``call(model, coors, feats, mask)`` runs it (default ``model(coors,
      feats=feats, mask=mask)``; a model with other keywords passes its own adapter) and returns
      coors_out (b, n, 3) or (b, n, d, 3), or (coors_out, feats_out).
    coors: (b, n, 3), any float dtype; cast to the model's parameter dtype after transforming.
    translate: add a different random translation per sample (SE(3) check). Whether the output
      should move with it is read from ``model.config.translation_equivariance`` unless
      ``output_translates`` says.
    input_dtype: round the transformed coordinates to this dtype before casting them to the model's
      dtype (e.g. float32 inputs for a float64 model); default: straight to the model's dtype.
    """
    if coors.ndim != 3 or coors.shape[-1] != 3:
        raise ValueError(f"coors must have shape (batch, points, 3), got {tuple(coors.shape)}")
    params = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    run_dtype = params.dtype if params is not None else coors.dtype
    if output_translates is None:
        output_translates = bool(getattr(getattr(model, "config", None), "translation_equivariance", False))
    device = coors.device
    b = coors.shape[0]
    x64 = coors.detach().to(torch.float64)
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype)
                if autocast_dtype is not None else contextlib.nullcontext())

    def run(x):
        with torch.no_grad(), autocast:
            if input_dtype is not None:
                x = x.to(input_dtype)
            return _split(call(model, x.to(run_dtype), feats, mask))

    c0, f0 = run(x64)
    c0, f0 = c0.to(torch.float64), None if f0 is None else f0.to(torch.float64)
    valid = torch.ones(coors.shape[:2], dtype=torch.bool, device=device) if mask is None else mask

    rots = random_rotations(num_rotations, dtype=torch.float64, device=device, generator=generator)
    rel = abs_err = 0.0
    for rot in rots:
        shift = (torch.randn(b, 1, 3, dtype=torch.float64, generator=generator).to(device) * translation_scale
                 if translate else torch.zeros(b, 1, 3, dtype=torch.float64, device=device))
        c1, f1 = run(x64 @ rot.T + shift)
        expect = c0 @ rot.T
        if output_translates:
            expect = expect + (shift if expect.ndim == 3 else shift.unsqueeze(1))
        diffs = [(c1.to(torch.float64) - expect)[valid]]
        refs = [expect[valid]]
        if f0 is not None:
            diffs.append((f1.to(torch.float64) - f0)[valid])
            refs.append(f0[valid])
        d = max(t.abs().max().item() for t in diffs)
        scale = max(t.abs().max().item() for t in refs)
        abs_err = max(abs_err, d)
        rel = max(rel, d / max(scale, torch.finfo(torch.float64).tiny))
    return EquivarianceError(rel=rel, abs=abs_err, num_rotations=num_rotations)


def _vn_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost VN building blocks of ``model``: the tensors a forward pass stores between them."""
    kinds = (layers.VNLinear, layers.VNReLU, layers.VNLayerNorm, layers.VNFeedForward, layers.VNAttention,
             layers.VNWeightedPool, layers.VNInvariant)  # vnt.compat's blocks are these too
    blocks: list[torch.nn.Module] = []

    def visit(module):
        for child in module.children():
            if isinstance(child, kinds):
                blocks.append(child)
            else:
                visit(child)

    visit(model)
    return blocks


def _rounding_hook(dtype: torch.dtype):
    """A forward hook that rounds a VN block's own output to ``dtype``. A layer norm called with a
    ``residual`` returns norm + residual: only the norm is the block's output (the sum is not stored
    in ``dtype`` by the model: a float32 residual plus a bfloat16 norm is float32), so only it is rounded."""
    def hook(module, args, kwargs, out):
        residual = kwargs.get("residual")
        if residual is None:
            return out.to(dtype).to(torch.float64)
        return module._norm(args[0]).to(dtype).to(torch.float64) + residual
    return hook


def rounding_floor(model, coors: Tensor, *, feats: Tensor | None = None, mask: Tensor | None = None,
                   dtype: torch.dtype = torch.float32, activations: bool = False, **kwargs) -> EquivarianceError:
    """The equivariance error that rounding to ``dtype`` alone causes, with exact arithmetic otherwise.

    Runs a float64 copy of ``model`` (same weights; ``model`` is not changed) on coordinates rounded
    to ``dtype`` after the rotation. With ``activations=True`` the output of every outermost VN block
    (linear maps, norms, attention, feed-forward) is also rounded to ``dtype``, i.e. the model stores
    its activations in ``dtype`` but computes each block exactly. Compare with
    ``equivariance_error(model, ...)`` at ``dtype``: the gap is what the implementation adds.
    Other keyword arguments go to ``equivariance_error``.
    """
    ref = copy.deepcopy(model).to(torch.float64)  # a throwaway copy: its hooks go with it
    if activations:
        for block in _vn_blocks(ref):
            block.register_forward_hook(_rounding_hook(dtype), with_kwargs=True)
    feats64 = feats.to(dtype).to(torch.float64) if feats is not None and feats.is_floating_point() else feats
    return equivariance_error(ref, coors, feats=feats64, mask=mask, input_dtype=dtype, **kwargs)
