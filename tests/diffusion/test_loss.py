import pytest
import torch

from diffusion_models import LocalConvModel, OracleModel
from patchddm_fast.diffusion import NoiseSchedule, diffusion_loss, model_input_buffer
from patchddm_fast.ops import coord_encoding, philox_normal

SCHEDULE = NoiseSchedule.linear()


def _batch(batch=2, size=8):
    image = torch.randn(batch, 4, size, size, size)
    coords = coord_encoding((size,) * 3, (0, 0, 0), (size,) * 3).expand(batch, -1, -1, -1, -1)
    buffer = model_input_buffer(torch.cat([image, coords], dim=1))
    mask = (torch.rand(batch, 1, size, size, size) > 0.7).float()
    return buffer, mask


class Recorder(torch.nn.Module):
    def forward(self, x, t):
        self.input, self.t = x.clone(), t.clone()
        return torch.zeros_like(x[:, 7:8]) + 0.1 * x[:, 0:1]


def test_loss_matches_its_definition():
    buffer, mask = _batch()
    condition = buffer[:, :7].clone()
    model = Recorder()
    out = diffusion_loss(model, buffer, mask, SCHEDULE, timesteps=torch.tensor([3, 900]), seed=11, return_details=True)
    noise = philox_normal(mask.shape, 11)
    ab = SCHEDULE.alphas_cumprod[[3, 900]].view(-1, 1, 1, 1, 1)
    x_t = (ab.sqrt() * mask.double() + (1 - ab).sqrt() * noise.double()).float()
    # The kernel's float32 q_sample against float64 rounded to float32: a few ulps of values below 4.
    torch.testing.assert_close(model.input[:, 7:8], x_t, rtol=1e-6, atol=1e-6)
    assert torch.equal(model.input[:, :7], condition)      # image and coordinates untouched
    assert model.t.tolist() == [3, 900] and model.t.dtype == torch.int64
    expected = ((0.1 * condition[:, 0:1] - noise) ** 2).mean()
    # Default float32 tolerances: one mean over the same values in another order.
    torch.testing.assert_close(out.loss, expected)
    assert out.seed == 11 and out.timesteps.tolist() == [3, 900]
    per_sample = diffusion_loss(model, buffer, mask, SCHEDULE, timesteps=torch.tensor([3, 900]), seed=11,
                                reduction="none")
    assert per_sample.shape == (2,)
    torch.testing.assert_close(per_sample.mean(), expected)


def test_perfect_denoiser_has_zero_loss():
    buffer, mask = _batch(batch=3)
    oracle = OracleModel()
    oracle.target = staticmethod(lambda x: mask)  # the model knows the mask: it recovers the noise exactly
    loss = diffusion_loss(oracle, buffer, mask, SCHEDULE, generator=torch.Generator().manual_seed(0))
    assert float(loss) < 1e-8


def test_random_timesteps_and_noise_follow_the_generator():
    buffer, mask = _batch(batch=4)
    model = Recorder()
    a = diffusion_loss(model, buffer, mask, SCHEDULE, generator=torch.Generator().manual_seed(5), return_details=True)
    b = diffusion_loss(model, buffer, mask, SCHEDULE, generator=torch.Generator().manual_seed(5), return_details=True)
    c = diffusion_loss(model, buffer, mask, SCHEDULE, generator=torch.Generator().manual_seed(6), return_details=True)
    assert torch.equal(a.timesteps, b.timesteps) and a.seed == b.seed and torch.equal(a.loss, b.loss)
    assert a.seed != c.seed
    assert all(0 <= t < 1000 for t in a.timesteps.tolist())


def test_gradients_reach_the_model():
    buffer, mask = _batch()
    model = LocalConvModel()
    loss = diffusion_loss(model, buffer, mask, SCHEDULE, seed=1)
    loss.backward()
    assert model.conv1.weight.grad is not None and float(model.conv1.weight.grad.abs().sum()) > 0


def test_bad_inputs():
    buffer, mask = _batch()
    model = Recorder()
    with pytest.raises(ValueError, match="model_input has shape"):
        diffusion_loss(model, buffer[:, :, :4], mask, SCHEDULE)
    with pytest.raises(ValueError, match="2 timesteps for a batch of 3|timesteps for a batch"):
        diffusion_loss(model, torch.cat([buffer, buffer[:1]]), torch.cat([mask, mask[:1]]), SCHEDULE,
                       timesteps=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="the model returned shape"):
        diffusion_loss(lambda x, t: x, buffer, mask, SCHEDULE)
    with pytest.raises(ValueError, match="reduction"):
        diffusion_loss(model, buffer, mask, SCHEDULE, reduction="sum")
