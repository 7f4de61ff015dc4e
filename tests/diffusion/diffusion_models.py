"""Small stand-in denoisers with the PatchDDM interface model(x, timesteps), x = [4 MR, 3 coords, x_t]."""

import torch

from patchddm_fast.diffusion import NoiseSchedule

IN_CHANNELS = 8


class _StandIn(torch.nn.Module):
    in_channels = IN_CHANNELS

    def __init__(self, size_multiple=1):
        super().__init__()
        self.size_multiple = size_multiple
        self.calls = []  # (input data pointer, timesteps) of every call

    def _check(self, x, t):
        assert x.shape[1] == IN_CHANNELS, x.shape
        if any(n % self.size_multiple for n in x.shape[2:]):
            raise ValueError(f"spatial size {tuple(x.shape[2:])} is not a multiple of {self.size_multiple}")
        assert t.dtype == torch.int64 and t.shape == (x.shape[0],)
        self.calls.append((x.data_ptr(), t.tolist()))


class OracleModel(_StandIn):
    """Predicts exactly the noise that makes x0 = (MR channel 0 > 0): DDIM then converges to it."""

    def __init__(self, size_multiple=1, schedule=None):
        super().__init__(size_multiple)
        self.alpha_bar = (schedule or NoiseSchedule.linear()).alphas_cumprod

    @staticmethod
    def target(image):
        return (image[:, 0:1] > 0).to(image.dtype)

    def forward(self, x, t):
        self._check(x, t)
        ab = self.alpha_bar[t.cpu()].to(x.device, torch.float64).view(-1, 1, 1, 1, 1)
        eps = (x[:, 7:8].double() - ab.sqrt() * self.target(x)) / (1 - ab).sqrt()
        return eps.to(x.dtype)


class LocalConvModel(_StandIn):
    """Two 3x3x3 convolutions: the output at a voxel depends on its 5^3 neighbourhood only.

    pointwise: 1x1x1 convolutions instead. per_sample: runs the batch one element at a time, so
    that its output does not depend on the batch size (PyTorch's CPU convolutions differ in
    the last bit between batch sizes).
    """

    def __init__(self, size_multiple=1, pointwise=False, per_sample=False, seed=0):
        super().__init__(size_multiple)
        self.per_sample = per_sample
        torch.manual_seed(seed)
        k = 1 if pointwise else 3
        self.conv1 = torch.nn.Conv3d(IN_CHANNELS, 6, k, padding=k // 2)
        self.conv2 = torch.nn.Conv3d(6, 1, k, padding=k // 2)
        self.autocast_seen = []

    def forward(self, x, t):
        self._check(x, t)
        self.autocast_seen.append(torch.is_autocast_enabled(x.device.type))
        if self.per_sample and x.shape[0] > 1:
            return torch.cat([self._forward(x[i:i + 1], t[i:i + 1]) for i in range(x.shape[0])])
        return self._forward(x, t)

    def _forward(self, x, t):
        h = torch.tanh(self.conv1(x))
        scale = (0.5 + t.float() / 2000).view(-1, 1, 1, 1, 1)
        return self.conv2(h) * scale + 0.3 * x[:, 7:8]
