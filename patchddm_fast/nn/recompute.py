"""The "cheap" activation checkpointing: conv(pre(x)) that stores x, not pre(x).

In a ResBlock branch, pre is GroupNorm + SiLU (+ the timestep bias, + the decoder's averaging
skip, + dropout); in the decoder's upsampling it is the nearest x2 interpolation. Autograd
would keep pre's output alive for the convolution's backward, a full-size tensor per
convolution (8x the input for the upsampling). Here backward recomputes pre from its stored
input, which is memory-bound and cheap next to a 3x3x3 convolution; the convolution itself is
never recomputed (its gradients come from aten.convolution_backward on the recomputed input).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .conv import conv3d_backward

# pre(x, add, skip) -> (average or None, y); called with skip=None on the stored average.
Pre = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"],
               "tuple[torch.Tensor | None, torch.Tensor]"]


def _autocast_state(device_type: str) -> dict:
    return {"enabled": torch.is_autocast_enabled(device_type),
            "dtype": torch.get_autocast_dtype(device_type)}


class _RecomputedPreConv(torch.autograd.Function):

    @staticmethod
    def forward(ctx, pre, conv, num_pre_params, x, skip, add, *params):
        with torch.no_grad():
            average, y = pre(x, add, skip)
            out = conv(y)
        ctx.pre, ctx.conv, ctx.num_pre_params = pre, conv, num_pre_params
        ctx.has_skip = skip is not None
        ctx.autocast = (x.device.type, _autocast_state(x.device.type))
        # The average carries all that x and skip contribute to y, and the ResBlock's residual
        # path keeps it alive anyway.
        ctx.save_for_backward(average if skip is not None else x, add, *params)
        return (out, average) if skip is not None else out

    @staticmethod
    def backward(ctx, grad_out, grad_average=None):
        stored, add, *params = ctx.saved_tensors
        pre_params, conv_params = params[:ctx.num_pre_params], params[ctx.num_pre_params:]
        needs = ctx.needs_input_grad
        device_type, autocast = ctx.autocast
        with torch.enable_grad(), torch.autocast(device_type, **autocast):
            stored_ = stored.detach().requires_grad_(needs[3] or needs[4])
            add_ = add.detach().requires_grad_(needs[5]) if add is not None else None
            _, y = ctx.pre(stored_, add_, None)

        weight = conv_params[0]
        has_bias = len(conv_params) > 1
        compute = grad_out.dtype  # the convolution's dtype (lower under autocast)
        grad_y, grad_weight, grad_bias = conv3d_backward(
            ctx.conv, grad_out, y.detach().to(compute), weight.detach().to(compute),
            (True, needs[6 + ctx.num_pre_params], has_bias and needs[7 + ctx.num_pre_params]))

        targets = [t for t in (stored_, add_, *pre_params) if t is not None and t.requires_grad]
        found = dict(zip(map(id, targets), torch.autograd.grad(y, targets, grad_y.to(y.dtype)))
                     if targets and y.requires_grad else ())
        del y, grad_y  # full-size: freed before the skip's gradient is formed
        grad_stored, grad_add = found.pop(id(stored_), None), found.get(id(add_)) if add_ is not None else None
        grad_x = grad_skip = grad_stored
        if ctx.has_skip:
            if grad_stored is None:
                grad_x = grad_skip = grad_average * 0.5
            else:
                # grad_stored is ours (fresh from autograd.grad): summed in place.
                if _shares_memory(grad_stored, grad_out, grad_average):
                    grad_stored = grad_stored.clone()
                grad_x = grad_skip = grad_stored.add_(grad_average).mul_(0.5)
            del grad_stored
        return (None, None, None, grad_x, grad_skip if ctx.has_skip else None, grad_add,
                *(found.get(id(p)) for p in pre_params),
                grad_weight.to(weight.dtype) if grad_weight is not None else None,
                *((grad_bias.to(conv_params[1].dtype) if grad_bias is not None else None,)
                  if has_bias else ()))


def _shares_memory(t: torch.Tensor, *others) -> bool:
    storage = t.untyped_storage().data_ptr()
    return any(o is not None and o.untyped_storage().data_ptr() == storage for o in others)


def recomputed_pre_conv(pre: Pre, conv: nn.Conv3d, x: torch.Tensor, skip: torch.Tensor | None = None,
                        add: torch.Tensor | None = None, pre_params=()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(conv(pre(x, add, skip)[1]), average), storing x (or the average) instead of pre's output.

    pre_params: the parameters pre uses (their gradients flow through the recomputation).
    Returns the average of x and skip as the second value (None without skip).
    """
    pre_params = tuple(p for p in pre_params if p is not None)
    conv_params = tuple(p for p in (conv.weight, conv.bias) if p is not None)
    out = _RecomputedPreConv.apply(pre, conv, len(pre_params), x, skip, add, *pre_params, *conv_params)
    return out if skip is not None else (out, None)


def seeded_dropout(y: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Dropout whose mask is a function of `seed`, so a recomputation draws the same mask."""
    generator = torch.Generator(device=y.device)
    generator.manual_seed(seed)
    keep = torch.empty_like(y).bernoulli_(1.0 - p, generator=generator)
    return y * keep / (1.0 - p)


def draw_seed() -> int:
    """A seed from the global generator (reproducible under torch.manual_seed)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))
