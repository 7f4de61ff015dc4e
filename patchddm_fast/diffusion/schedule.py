"""Noise schedules: the betas of the forward process and every coefficient derived from them.

All arrays are float64 CPU tensors, as in the original (guided-diffusion computes them in
float64 numpy): the samplers read single values from them on the host and hand them to the
fused noise-update ops, which apply them in float32.
"""

from __future__ import annotations

import math

import torch

# guided-diffusion's linear schedule for 1000 steps (PatchDDM's); scaled by 1000 / T by from_name
LINEAR_BETA_START, LINEAR_BETA_END = 1e-4, 0.02


class NoiseSchedule:
    """A discrete forward process with T steps, t = 0 .. T-1.

    Attributes (float64 tensors of shape (T,)):
        betas, alphas (1 - beta), alphas_cumprod (alpha_bar_t), alphas_cumprod_prev
        (alpha_bar_{t-1}, 1 at t = 0), sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
        posterior_variance (beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)),
        posterior_mean_coef1 / coef2 (of x0 and x_t in the mean of q(x_{t-1} | x_t, x0)).
    """

    def __init__(self, betas, name: str = "custom", settings: dict | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().clone()
        if betas.dim() != 1 or betas.numel() < 1:
            raise ValueError(f"NoiseSchedule: betas must be a non-empty 1-D array, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("NoiseSchedule: every beta must lie in (0, 1) (NaN is invalid)")
        self.name = name
        # what rebuilds it (to_dict): the generator's arguments, or the betas themselves
        self.settings = dict(settings) if settings is not None else {"betas": betas.tolist()}
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)

    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    def __len__(self) -> int:
        return self.num_timesteps

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.name!r}, T={self.num_timesteps})"

    def alpha_bar(self, timesteps) -> torch.Tensor:
        """alpha_bar at integer timesteps (an int, a list or a tensor), as float64 CPU values."""
        index = torch.as_tensor(timesteps, dtype=torch.int64).cpu()
        if bool(((index < 0) | (index >= self.num_timesteps)).any()):
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps}), got {index.tolist()}")
        return self.alphas_cumprod[index]

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """Betas evenly spaced from beta_start to beta_end, taken as given for any num_timesteps
        (as diffusers' beta_schedule="linear" does). For guided-diffusion's named "linear"
        schedule, which scales both ends by 1000 / num_timesteps, use from_name("linear", T)."""
        _check_steps(num_timesteps)
        return cls(torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64), "linear",
                   {"num_timesteps": num_timesteps, "beta_start": float(beta_start), "beta_end": float(beta_end)})

    @classmethod
    def scaled_linear(cls, num_timesteps: int = 1000, beta_start: float = 0.00085,
                      beta_end: float = 0.012) -> "NoiseSchedule":
        """sqrt(beta) evenly spaced from sqrt(beta_start) to sqrt(beta_end) (diffusers'
        "scaled_linear", latent diffusion's schedule), taken as given."""
        _check_steps(num_timesteps)
        roots = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float64)
        return cls(roots ** 2, "scaled_linear")

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "NoiseSchedule":
        """Nichol & Dhariwal (2021): alpha_bar(t) = f(t) / f(0), f(t) = cos((t/T + s) / (1 + s) * pi/2)^2,
        betas = 1 - alpha_bar(t+1) / alpha_bar(t), capped at max_beta (the end of the schedule)."""
        _check_steps(num_timesteps)
        grid = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((grid + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
        return cls(betas, "cosine", {"num_timesteps": num_timesteps, "s": float(s), "max_beta": float(max_beta)})

    @classmethod
    def from_name(cls, name: str, num_timesteps: int = 1000) -> "NoiseSchedule":
        """guided-diffusion's named schedules (get_named_beta_schedule), PatchDDM's origin.

        "linear": betas from 1e-4 to 0.02 scaled by 1000 / num_timesteps, so that any number of
        steps spans the same noise levels (the 1000-step schedule unchanged; 0.4 at the end of a
        50-step one); "cosine": Nichol & Dhariwal's. Betas given explicitly (NoiseSchedule.linear,
        the schedulers' beta_start / beta_end) are never scaled, as in diffusers.
        """
        if name == "linear":
            _check_steps(num_timesteps)
            scale = 1000 / num_timesteps
            if scale * LINEAR_BETA_END >= 1:
                raise ValueError(f"the named 'linear' schedule scales its betas by 1000 / num_timesteps; with "
                                 f"num_timesteps={num_timesteps} the last beta would be {scale * LINEAR_BETA_END:g} "
                                 f">= 1 (it needs num_timesteps > {int(1000 * LINEAR_BETA_END)})")
            return cls.linear(num_timesteps, scale * LINEAR_BETA_START, scale * LINEAR_BETA_END)
        if name == "cosine":
            return cls.cosine(num_timesteps)
        raise ValueError(f"unknown beta schedule {name!r}; expected 'linear' or 'cosine'")

    def to_dict(self) -> dict:
        """Plain data that from_dict turns back into this schedule (as checkpoints store it)."""
        return {"name": self.name, **self.settings}

    @classmethod
    def from_dict(cls, data: dict) -> "NoiseSchedule":
        """The schedule of to_dict's data. A linear or cosine schedule may leave out its
        parameters (their defaults: PatchDDM's 1000 steps from 1e-4 to 0.02). A linear one that
        gives num_timesteps but neither beta is guided-diffusion's named schedule (from_name:
        betas scaled by 1000 / num_timesteps); betas given are taken as given."""
        data = dict(data)
        name = data.pop("name", "linear")
        if "betas" in data:  # recorded as the betas themselves (a custom or diffusers-built schedule)
            _settings({k: v for k, v in data.items() if k != "betas"}, ())
            return cls(data["betas"], str(name))
        if name == "linear" and not {"beta_start", "beta_end"} & set(data):
            _settings(data, ("num_timesteps",))
            return cls.from_name("linear", int(data.get("num_timesteps", 1000)))
        if name == "linear":
            return cls.linear(**_settings(data, ("num_timesteps", "beta_start", "beta_end")))
        if name == "cosine":
            return cls.cosine(**_settings(data, ("num_timesteps", "s", "max_beta")))
        if "betas" in data:
            return cls(data["betas"], str(name))
        raise ValueError(f"noise schedule {name!r}: not linear or cosine, and no betas given")


def _settings(data: dict, known: tuple) -> dict:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown noise schedule settings {unknown}; known: {list(known)}")
    return {k: int(v) if k == "num_timesteps" else float(v) for k, v in data.items()}


def _check_steps(num_timesteps) -> None:
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
