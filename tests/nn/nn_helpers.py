"""What the U-Net tests share: random weights, one training step, relative errors."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from patchddm_fast.nn import FusedGroupNormSiLU, UNet3D, UNetConfig

# Small enough for a training step in well under a second on one core, with every kind of
# block: 3 levels (two downsamplings, two upsamplings), ResBlocks that change channels
# (a 1x1x1 residual convolution) and ones that keep them, groups < channels.
TINY = UNetConfig(model_channels=4, channel_mult=(1, 2, 2), num_res_blocks=1, in_channels=3,
                  out_channels=2, groups=2)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere, also in the convolutions the original zero-initialises
    (otherwise most gradients are zero and a wrong one would go unnoticed)."""
    generator = torch.Generator().manual_seed(seed)
    norms = {id(p) for m in model.modules() if isinstance(m, (nn.GroupNorm, FusedGroupNormSiLU))
             for p in m.parameters(recurse=False)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.dim() > 1:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif id(p) in norms and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return model


def twin(model: UNet3D, **options) -> UNet3D:
    """The same network and weights with other execution options."""
    other = UNet3D(model.config, **options)
    other.load_state_dict(model.state_dict())
    return other.train(model.training)


def inputs(config: UNetConfig, size: int = 8, batch: int = 2, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, size, size, size, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    target = torch.randn(batch, config.out_channels, size, size, size, generator=generator)
    return x, t, target


def training_step(model: nn.Module, x, t, target, bf16: bool = False):
    """(output, {name: gradient}, input gradient) of forward, MSE loss and backward."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        out = model(x, t)
    torch.nn.functional.mse_loss(out.float(), target).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return out.detach().float(), grads, x.grad.detach().clone()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: order 1 for a wrong computation."""
    scale = expected.double().abs().max().clamp_min(1e-30)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


def norm_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||: for comparisons at low precision, where a few
    elements may be far off in relative terms."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def assert_same_step(actual, expected, tol: float, what: str) -> None:
    """Outputs, every parameter gradient and the input gradient agree to `tol` (relative)."""
    out, grads, grad_x = actual
    ref_out, ref_grads, ref_grad_x = expected
    assert out.shape == ref_out.shape
    assert relative_error(out, ref_out) < tol, f"{what}: output"
    assert grads.keys() == ref_grads.keys()
    bad = {name: relative_error(grads[name], ref_grads[name]) for name in grads}
    bad = {name: err for name, err in bad.items() if not err < tol}
    assert not bad, f"{what}: parameter gradients differ: {bad}"
    # tol comes from the caller, with its reason there.
    assert relative_error(grad_x, ref_grad_x) < tol, f"{what}: input gradient"
