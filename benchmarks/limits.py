"""How far from the hardware: the work the U-Net and the fused ops must do, and the device's
measured ceilings.

- FLOPs: every Conv3d and Linear of a model counts 2 multiply-adds' worth per output element
  and input channel and kernel tap (bias and elementwise work not counted, as
  torch.utils.flop_counter does), from forward hooks. A training step adds, per layer, the
  weight gradient (same FLOPs as its forward) and the input gradient (same again, only where
  the layer's input needs a gradient: not for the network's first convolution).
  Activation checkpointing recomputes some forwards; that work is not counted here.
- Bytes: the least a fused op must move through device memory, each input read once and each
  output written once (noise drawn inside the kernel moves nothing).
- Ceilings: one large matrix product (TFLOP/s) and one large device-to-device copy (GB/s,
  bytes read plus bytes written), measured on the device in the same run.

Counting on the paper's network at 256^3 needs no arithmetic: the model runs on fake tensors
(shapes and dtypes only) under torch._subclasses.fake_tensor.FakeTensorMode.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
import statistics
import time

import torch

GIB = 2**30


# -- FLOPs -------------------------------------------------------------------------------------

def _conv_flops(module: torch.nn.Conv3d, out: torch.Tensor) -> int:
    return 2 * out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)


def _linear_flops(module: torch.nn.Linear, out: torch.Tensor) -> int:
    return 2 * out.numel() * module.in_features


class LayerFlops:
    """Forward hooks on every Conv3d and Linear of a model, summing their FLOPs while active.

    forward: FLOPs of the forward passes seen; backward: what their backward passes would cost
    (weight gradients where the weight needs one, input gradients where the input needs one).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.forward = self.backward = 0
        self.layers = 0
        self._handles = []

    def _hook(self, module, inputs, out):
        flops = _conv_flops(module, out) if isinstance(module, torch.nn.Conv3d) else _linear_flops(module, out)
        self.forward += flops
        self.layers += 1
        if module.weight.requires_grad and torch.is_grad_enabled():
            self.backward += flops
        if inputs[0].requires_grad and torch.is_grad_enabled():
            self.backward += flops

    def __enter__(self):
        for module in self.model.modules():
            if isinstance(module, (torch.nn.Conv3d, torch.nn.Linear)):
                self._handles.append(module.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def train_step(self) -> int:
        return self.forward + self.backward


def _unet(preset, fused: bool):
    """A U-Net of a preset name or a UNetConfig."""
    from patchddm_fast.nn import PRESETS, UNet3D

    return UNet3D(PRESETS[preset] if isinstance(preset, str) else preset, fused=fused)


def unet_flops(preset="paper", shape=(256, 256, 256), batch: int = 1) -> dict:
    """FLOPs of one forward and of one training step (forward + backward) of a preset's U-Net
    (a name or a UNetConfig) on a (batch, in_channels, *shape) input, counted on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    shape = tuple(shape)
    with FakeTensorMode():
        model = _unet(preset, fused=False)  # the same convolutions as the fused one
        x = torch.empty((batch, model.config.in_channels) + shape)
        t = torch.zeros(batch, dtype=torch.int64)
        with LayerFlops(model) as counted:
            model(x, t)
    return dict(forward=counted.forward, backward=counted.backward, train_step=counted.train_step,
                layers=counted.layers, voxels=batch * math.prod(shape))


# -- bytes of the fused ops --------------------------------------------------------------------

def group_norm_silu_bytes(shape, itemsize: int, *, add: bool, skip: bool, backward: bool = False,
                          groups: int = 1) -> int:
    """Least bytes of one group_norm_silu call (forward, or its backward).

    forward: read x (and skip, the (B, C) add, weight and bias), write y (and the average when
    skipping) and the float32 statistics (mean, rstd per (batch, group)).
    backward: read the output gradient, the saved input (and the average's gradient when
    skipping), add, weight, bias and statistics; write the input gradient (the skip gets the
    same tensor) and the add, weight and bias gradients.
    """
    n = math.prod(shape)
    batch, channels = shape[0], shape[1]
    small = (2 * channels + (batch * channels if add else 0)) * itemsize
    stats = 2 * batch * groups * 4
    if not backward:
        return n * itemsize * (2 + 2 * skip) + small + stats
    return n * itemsize * (3 + skip) + small + stats + small


def avg_skip_bytes(shape, itemsize: int) -> int:
    return 3 * math.prod(shape) * itemsize


def ddim_step_bytes(shape, itemsize: int, x0_out: bool = True) -> int:
    """read x_t and eps, write x_prev (and x0): the sampler's update."""
    return (3 + x0_out) * math.prod(shape) * itemsize


def q_sample_bytes(shape, itemsize: int) -> int:
    """read x0, write x_t (the noise is drawn in the kernel)."""
    return 2 * math.prod(shape) * itemsize


def assemble_input_bytes(batch: int, channels: int, patch, itemsize: int = 4) -> int:
    """read each patch's crop of `channels` image channels and its x_t, write channels + 3
    coordinates + x_t."""
    voxels = batch * math.prod(patch)
    return voxels * itemsize * ((channels + 1) + (channels + 4))


def fused_op_traffic(preset="paper", shape=(256, 256, 256), batch: int = 1, train: bool = False,
                     precision: str = "float32") -> dict:
    """Calls and least bytes per fused op in one sampling step (train=False: U-Net forward and
    the DDIM update) or one training step (forward noising, forward, backward), counted from
    the fused U-Net's norm modules running on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from patchddm_fast.nn import FusedGroupNormSiLU

    shape = tuple(shape)
    calls: list[tuple] = []

    def hook(module, args, kwargs, out):
        x = args[0]
        calls.append((tuple(x.shape), x.element_size(), kwargs.get("add") is not None,
                      kwargs.get("skip") is not None, module.num_groups))

    with FakeTensorMode():
        model = _unet(preset, fused=True)
        handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules()
                   if isinstance(m, FusedGroupNormSiLU)]
        x = torch.empty((batch, model.config.in_channels) + shape)
        t = torch.zeros(batch, dtype=torch.int64)
        context = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bfloat16" else nullcontext()
        with context, torch.set_grad_enabled(train):
            model(x, t)
        for handle in handles:
            handle.remove()

    traffic = {"group_norm_silu": [0, 0]}
    for call_shape, itemsize, add, skip, groups in calls:
        traffic["group_norm_silu"][0] += 1
        traffic["group_norm_silu"][1] += group_norm_silu_bytes(call_shape, itemsize, add=add, skip=skip, groups=groups)
    if train:
        traffic["group_norm_silu backward"] = [len(calls), sum(
            group_norm_silu_bytes(s, i, add=a, skip=k, groups=g, backward=True) for s, i, a, k, g in calls)]
        traffic["q_sample"] = [1, q_sample_bytes((batch, 1) + shape, 4)]
    else:
        traffic["ddim_step"] = [1, ddim_step_bytes((batch, 1) + shape, 4)]
    return {op: dict(calls=c, bytes=b) for op, (c, b) in traffic.items()}


# -- ceilings --------------------------------------------------------------------------------

def _seconds(fn, device: torch.device, rounds: int, warmup: int) -> float:
    """Median seconds of fn() (CUDA events on a GPU, the wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(rounds):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - begin)
    return statistics.median(samples)


def matmul_tflops(device, n: int, dtype=torch.float32, rounds: int = 10, allow_tf32: bool = False) -> float:
    """TFLOP/s of an n x n x n matrix product on random data (2 n^3 FLOPs)."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    out = torch.empty(n, n, device=device, dtype=dtype)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        seconds = _seconds(lambda: torch.mm(a, b, out=out), device, rounds, warmup=3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * n**3 / seconds / 1e12


def copy_gbps(device, nbytes: int, rounds: int = 10) -> float:
    """GB/s of a device-to-device copy of nbytes, counting bytes read plus bytes written."""
    device = torch.device(device)
    source = torch.randn(nbytes // 4, device=device, generator=torch.Generator(device=device).manual_seed(0))
    target = torch.empty_like(source)
    seconds = _seconds(lambda: target.copy_(source), device, rounds, warmup=3)
    return 2 * source.nbytes / seconds / 1e9


def measured_peaks(device) -> dict:
    """The device's ceilings, measured now: matrix product TFLOP/s per precision, copy GB/s."""
    device = torch.device(device)
    if device.type == "cuda":
        peaks = dict(matmul_tflops_float32=matmul_tflops(device, 8192, torch.float32),
                     matmul_tflops_tf32=matmul_tflops(device, 8192, torch.float32, allow_tf32=True),
                     matmul_tflops_bfloat16=matmul_tflops(device, 8192, torch.bfloat16),
                     copy_gbps=copy_gbps(device, 2 * GIB),
                     device_name=torch.cuda.get_device_name(device))
    else:
        peaks = dict(matmul_tflops_float32=matmul_tflops(device, 2048, torch.float32, rounds=5),
                     copy_gbps=copy_gbps(device, 256 * 2**20, rounds=5),
                     device_name=cpu_name())
    return peaks


def matmul_peak_for(peaks: dict, precision: str, device_type: str) -> float:
    """The ceiling a U-Net of this precision is held to: bf16 matrix units for bfloat16; on a
    GPU, TF32 for float32 (cuDNN runs float32 convolutions in TF32 by default); else float32."""
    if precision == "bfloat16" and "matmul_tflops_bfloat16" in peaks:
        return peaks["matmul_tflops_bfloat16"]
    if device_type == "cuda" and torch.backends.cudnn.allow_tf32 and "matmul_tflops_tf32" in peaks:
        return peaks["matmul_tflops_tf32"]
    return peaks["matmul_tflops_float32"]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"
