"""Issue 14, defect 9: the ops refuse arguments that would give a silently wrong result, on every
backend (each op has one check function, shared by its PyTorch, compiled and Triton paths), and
accept any integer type where an integer is asked for."""

import numpy as np
import pytest
import torch
from helpers import backend_params

from patchddm_fast.ops import coord_encoding, ddim_step, ddpm_step, group_norm_silu


@pytest.mark.parametrize("device,backend", backend_params("noise_update"))
def test_sampling_steps_need_the_noise_prediction(device, backend):
    x = torch.randn(2, 3, 4, device=device)
    with pytest.raises(TypeError, match=r"ddim_step: eps \(the network's noise prediction\) is required"):
        ddim_step(x, None, 0.5, 0.9, backend=backend)
    with pytest.raises(TypeError, match=r"ddpm_step: eps \(the network's noise prediction\) is required"):
        ddpm_step(x, None, 0.5, 0.9, backend=backend)
    with pytest.raises(ValueError, match="ddim_step: eps has shape"):
        ddim_step(x, x[:, :2], 0.5, 0.9, backend=backend)


@pytest.mark.parametrize("device,backend", backend_params("noise_update"))
@pytest.mark.parametrize("eta", [float("inf"), float("nan"), -1.0])
def test_ddim_eta_must_be_finite_and_non_negative(device, backend, eta):
    x = torch.randn(2, 3, 4, device=device)
    with pytest.raises(ValueError, match="ddim_step: eta must be (>= 0|finite), got"):
        ddim_step(x, torch.randn_like(x), 0.5, 0.9, eta=eta, seed=1, backend=backend)


@pytest.mark.parametrize("device,backend", backend_params("group_norm_silu"))
@pytest.mark.parametrize("eps", [float("inf"), float("nan"), 0.0, -1e-5])
def test_group_norm_eps_must_be_positive_and_finite(device, backend, eps):
    x = torch.randn(2, 4, 5, device=device)
    with pytest.raises(ValueError, match="group_norm_silu: eps must be positive and finite"):
        group_norm_silu(x, None, None, 2, eps, backend=backend)


def test_compiled_group_norm_refuses_infinite_eps():
    # torch.ops.patchddm.* are public too: the C++ check (csrc/group_norm_silu_args.h) says the same.
    with pytest.raises(RuntimeError, match="eps must be positive and finite"):
        torch.ops.patchddm.group_norm_silu_forward(torch.randn(2, 4, 5), None, None, None, None, 2, float("inf"))


@pytest.mark.parametrize("device,backend", backend_params("group_norm_silu"))
@pytest.mark.parametrize("groups", [np.int64(2), np.int32(2), torch.tensor(2)], ids=["np.int64", "np.int32", "tensor"])
def test_group_norm_accepts_any_integer_type_for_groups(device, backend, groups):
    x = torch.randn(2, 4, 5, device=device, dtype=torch.float64)
    # The same op with the same int: the same kernel, so the same bits.
    torch.testing.assert_close(group_norm_silu(x, None, None, groups, backend=backend),
                               group_norm_silu(x, None, None, 2, backend=backend), rtol=0, atol=0)


@pytest.mark.parametrize("groups", [2.0, True, "2"])
def test_group_norm_refuses_non_integer_groups(groups):
    with pytest.raises(TypeError, match="group_norm_silu: groups must be an integer"):
        group_norm_silu(torch.randn(2, 4, 5), None, None, groups)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64], ids=str)
def test_coord_encoding_refuses_non_float_dtypes(dtype):
    with pytest.raises(TypeError, match="coord_encoding: dtype must be a floating-point dtype"):
        coord_encoding((2, 2, 2), (0, 0, 0), (4, 4, 4), dtype=dtype)


def test_coord_encoding_float_dtypes_still_work():
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        coords = coord_encoding((2, 2, 2), (0, 0, 0), (3, 3, 3), dtype=dtype)
        assert coords.dtype == dtype and coords[0, 1, 0, 0].item() == 0.0  # linspace(-1, 1, 3)[1], exact


# -- issue 14, defect 10: the documented bound of the noise's agreement across backends ---------

@pytest.mark.parametrize("device,backend", backend_params("noise_update"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_philox_backends_agree_within_the_documented_bound(device, backend, dtype):
    from patchddm_fast.ops import philox_normal
    from patchddm_fast.ops.philox import PHILOX_BACKEND_ATOL

    z = philox_normal((4, 50_000), 7, 3, dtype=dtype, device=device, backend=backend).cpu()
    reference = philox_normal((4, 50_000), 7, 3, dtype=dtype, backend="torch")
    assert z.dtype == dtype
    # PHILOX_BACKEND_ATOL: a few float32 ulps of |z| < 5.8 (patchddm_fast/ops/philox.py says why);
    # float64 noise holds float32 values, so it is held to the same bound, not to float64's.
    assert (z - reference).abs().max().item() <= PHILOX_BACKEND_ATOL
    assert torch.equal(z.float().double(), z.double())  # float32 values in every dtype


def test_philox_docs_state_the_true_bound():
    from patchddm_fast.ops import philox_normal

    assert "last bits" not in philox_normal.__doc__ and "2e-6" in philox_normal.__doc__
