import numpy as np
import pytest
import torch

from helpers import DTYPES, assert_close, backend_params
from patchddm_fast.ops import assemble_input, assemble_input_reference, coord_encoding

BACKENDS = backend_params("assemble_input")
KERNEL_BACKENDS = [p for p in BACKENDS if p.values[1] != "torch"]


def linspace_coords(patch, offset, full, dtype=torch.float32):
    """The original's construction: linspace(-1, 1, N) per axis, meshgrid, cropped."""
    axes = [torch.linspace(-1, 1, n, dtype=dtype)[o:o + p] for n, o, p in zip(full, offset, patch)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def exact_axis(n, dtype=torch.float32):
    """linspace(-1, 1, n) correctly rounded to dtype (float64 of exact integers, rounded once)."""
    j = np.arange(n, dtype=np.float64)
    values = (2 * j - (n - 1)) / (n - 1) if n > 1 else -np.ones(1)
    return torch.from_numpy(values).to(dtype)


def expect_equal(actual, expected, device, backend):
    """Every backend writes the same bits, except that the Triton interpreter rounds float
    to bfloat16 by truncation (compiled Triton rounds to nearest)."""
    if backend == "triton" and device == "cpu" and expected.dtype == torch.bfloat16:
        assert_close(actual, expected)
    else:
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        assert torch.equal(actual, expected), (actual.double() - expected.double()).abs().max()


# -- coordinate encoding ---------------------------------------------------------------------

@pytest.mark.parametrize("full,patch,offset", [
    ((256, 256, 256), (128, 3, 128), (0, 64, 128)),    # the paper's volume
    ((155, 240, 240), (155, 17, 3), (0, 223, 101)),
    ((7, 2, 13), (7, 2, 13), (0, 0, 0)),
    ((1, 5, 1), (1, 3, 1), (0, 2, 0)),                  # size-1 axes: linspace(-1, 1, 1) = -1
])
def test_coord_encoding_matches_linspace_crops(full, patch, offset):
    coords = coord_encoding(patch, offset, full)
    assert coords.shape == (3,) + patch and coords.dtype == torch.float32
    # torch.linspace accumulates steps (differently on CPU and CUDA); ours is the correctly
    # rounded value, so they agree to float32 rounding near 1.
    torch.testing.assert_close(coords, linspace_coords(patch, offset, full), atol=2**-23, rtol=0)
    for k in range(3):
        view = [1, 1, 1]
        view[k] = patch[k]
        exact = exact_axis(full[k])[offset[k]:offset[k] + patch[k]].reshape(view).expand(patch)
        assert torch.equal(coords[k], exact)
    double = coord_encoding(patch, offset, full, dtype=torch.float64)
    torch.testing.assert_close(double, linspace_coords(patch, offset, full, torch.float64), atol=1e-15, rtol=0)


def test_coord_encoding_endpoints_and_symmetry():
    for n in (2, 3, 96, 155, 256, 257):
        axis = coord_encoding((n, 1, 1), (0, 0, 0), (n, 1, 1))[0, :, 0, 0]
        assert axis[0] == -1 and axis[-1] == 1
        assert torch.equal(axis, -axis.flip(0))  # the exact values are odd-symmetric
        assert bool((axis[1:] > axis[:-1]).all())


def test_coord_encoding_bad_input():
    with pytest.raises(ValueError, match="does not fit"):
        coord_encoding((4, 4, 4), (1, 0, 0), (4, 8, 8))
    with pytest.raises(ValueError, match="3 entries"):
        coord_encoding((4, 4), (0, 0), (8, 8))
    with pytest.raises(TypeError, match="offset must be 3 integers"):
        coord_encoding((4, 4, 4), (0.5, 0, 0), (8, 8, 8))


# -- assemble_input against the reference ----------------------------------------------------

# (volume shape, patch, offsets, x_t channels)
CASES = {
    "primes": ((2, 3, 11, 13, 7), (5, 7, 3), [[0, 0, 0], [6, 6, 4]], 1),
    "size1-shared": ((1, 2, 1, 9, 5), (1, 4, 5), [[0, 5, 0], [0, 0, 0], [0, 3, 0]], 2),
    "full-volume": ((1, 4, 6, 5, 8), (6, 5, 8), [[0, 0, 0], [0, 0, 0]], 1),
    "no-x_t": ((3, 1, 9, 8, 16), (4, 8, 8), [[5, 0, 8], [2, 0, 3], [0, 0, 0]], 0),
}


def make_case(name, device, dtype):
    shape, patch, offsets, extra = CASES[name]
    volume = torch.randn(shape, device=device).to(dtype)
    x_t = torch.randn((len(offsets), extra) + patch, device=device).to(dtype) if extra else None
    return volume, offsets, x_t, patch


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(device, backend, dtype, case):
    volume, offsets, x_t, patch = make_case(case, device, dtype)
    out = assemble_input(volume, offsets, x_t, patch, backend=backend)
    expected = assemble_input_reference(volume, offsets, x_t, patch, volume.shape[2:])
    expect_equal(out, expected, device, backend)
    assert out.is_contiguous()
    # independent of the reference: the image channels are the crop, then the coordinates
    b, o = len(offsets) - 1, offsets[-1]
    crop = volume[b if volume.shape[0] > 1 else 0][:, o[0]:o[0] + patch[0], o[1]:o[1] + patch[1], o[2]:o[2] + patch[2]]
    assert torch.equal(out[b, :volume.shape[1]], crop)
    assert_close(out[b, volume.shape[1]:volume.shape[1] + 3],
                 linspace_coords(patch, o, volume.shape[2:], torch.float64).to(device, dtype),
                 scale=2e4 if dtype == torch.float64 else 1.0)  # torch.linspace: accumulated steps


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_many_patches_and_large_offsets(device, backend):
    # more patches than the CUDA kernel passes inline (32): offsets go through a device buffer
    volume = torch.randn(1, 1, 12, 10, 9, device=device)
    offsets = torch.stack([torch.randint(0, n - p + 1, (33,)) for n, p in zip((12, 10, 9), (1, 3, 2))], 1)
    x_t = torch.randn(33, 1, 1, 3, 2, device=device)
    out = assemble_input(volume, offsets, x_t, (1, 3, 2), backend=backend)
    expect_equal(out, assemble_input_reference(volume, offsets, x_t, (1, 3, 2), (12, 10, 9)), device, backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_coord_shape_larger_than_volume(device, backend):
    # coordinates normalised by a bigger grid than the stored volume (a crop of a padded grid)
    volume = torch.randn(1, 1, 6, 6, 6, device=device)
    out = assemble_input(volume, [1, 2, 0], None, (4, 3, 6), coord_shape=(256, 7, 6), backend=backend)
    expect_equal(out[0, 1:], coord_encoding((4, 3, 6), (1, 2, 0), (256, 7, 6), device=device), device, backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs_and_strided_out(device, backend, dtype):
    base = torch.randn(2, 9, 7, 12, 3, device=device).to(dtype)
    volume = base.permute(0, 4, 1, 2, 3)[:, :, 1:, :, ::2]  # channels-last, sliced and stepped: (2, 3, 8, 7, 6)
    x_t = torch.randn(2, 5, 4, 3, 2, device=device, dtype=torch.float64).transpose(2, 4)[:, 1:3]  # (2, 2, 2, 3, 4)
    offsets = [[6, 4, 2], [0, 0, 0]]
    buffer = torch.full((2, 10, 2, 3, 4), 7.0, device=device, dtype=dtype)
    out = buffer[:, 1:9]                                     # a channel slice of a bigger buffer
    assert not volume.is_contiguous() and not x_t.is_contiguous() and not out.is_contiguous()
    result = assemble_input(volume, offsets, x_t, (2, 3, 4), out=out, backend=backend)
    assert result is out
    expected = assemble_input_reference(volume.contiguous(), offsets, x_t.contiguous(), (2, 3, 4), (8, 7, 6))
    expect_equal(out, expected, device, backend)
    assert bool((buffer[:, 0] == 7).all()) and bool((buffer[:, 9] == 7).all())
    # an out whose innermost dimension is not contiguous (channels-last)
    out_cl = torch.empty(2, 2, 3, 4, 8, device=device, dtype=dtype).permute(0, 4, 1, 2, 3)
    assemble_input(volume, offsets, x_t, (2, 3, 4), out=out_cl, backend=backend)
    expect_equal(out_cl, expected, device, backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_out_without_x_t_keeps_its_last_channels(device, backend):
    volume = torch.randn(1, 4, 9, 9, 9, device=device)
    out = torch.full((2, 9, 5, 4, 3), 3.5, device=device)
    offsets = [[4, 0, 6], [1, 5, 0]]
    assemble_input(volume, offsets, None, (5, 4, 3), out=out, backend=backend)
    expect_equal(out[:, :7], assemble_input_reference(volume, offsets, None, (5, 4, 3), (9, 9, 9)), device, backend)
    assert bool((out[:, 7:] == 3.5).all())


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("volume_dtype,x_t_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float64),
                                                    (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_x_t_of_another_dtype_is_converted(device, backend, volume_dtype, x_t_dtype):
    volume = torch.randn(2, 2, 5, 6, 7, device=device).to(volume_dtype)
    x_t = (torch.randn(2, 1, 3, 4, 5, device=device) * 3).to(x_t_dtype)
    out = assemble_input(volume, [[2, 0, 1], [0, 2, 2]], x_t, (3, 4, 5), backend=backend)
    assert out.dtype == volume_dtype
    expect_equal(out[:, 5:], x_t.to(volume_dtype), device, backend)


def test_python_conveniences():
    volume = torch.randn(4, 8, 8, 8)  # (C, D, H, W): one volume
    out = assemble_input(volume, np.array([1, 2, 3]), None, (4, 4, 4))
    assert out.shape == (1, 7, 4, 4, 4)
    assert torch.equal(out, assemble_input_reference(volume[None], [[1, 2, 3]], None, (4, 4, 4), (8, 8, 8)))
    full = assemble_input(volume, torch.zeros(3, dtype=torch.int32))  # default patch: the whole volume
    assert full.shape == (1, 7, 8, 8, 8) and torch.equal(full[0, :4], volume)


# -- torch.library and torch.compile ---------------------------------------------------------

@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_opcheck(device, backend):
    namespace = torch.ops.patchddm_triton if backend == "triton" else torch.ops.patchddm
    volume = torch.randn(1, 1, 4, 5, 3, device=device)
    offsets = torch.tensor([[1, 0, 0], [0, 2, 1]])
    x_t = torch.randn(2, 1, 2, 3, 2, device=device, dtype=torch.float64)
    torch.library.opcheck(namespace.assemble_input, (volume, offsets, x_t, [2, 3, 2], [4, 5, 3]))
    out = torch.zeros(2, 5, 2, 3, 2, device=device)
    torch.library.opcheck(namespace.assemble_input_out, (volume, offsets, None, [2, 3, 2], [9, 9, 9], out))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_compile_fullgraph(device, backend):
    def f(volume, x_t, buffer):
        inputs = assemble_input(volume * 2, [[0, 1, 2], [3, 0, 0]], x_t, (3, 4, 4), backend=backend)
        assemble_input(volume, [[1, 1, 1], [0, 0, 0]], None, (3, 4, 4), out=buffer, backend=backend)
        return inputs.sum(dim=(2, 3, 4)) + buffer.sum()

    volume = torch.randn(1, 2, 6, 5, 6, device=device)
    x_t = torch.randn(2, 1, 3, 4, 4, device=device)
    expected_buffer = torch.zeros(2, 6, 3, 4, 4, device=device)
    expected = f(volume, x_t, expected_buffer)
    buffer = torch.zeros(2, 6, 3, 4, 4, device=device)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert_close(compiled(volume, x_t, buffer), expected)
    assert torch.equal(buffer, expected_buffer)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_compile_with_tensor_offsets(device, backend):
    # offsets as a graph input: the op reads them at run time, so new positions need no recompile
    def f(volume, offsets):
        return assemble_input(volume, offsets, None, (2, 2, 2), backend=backend)

    volume = torch.randn(1, 1, 5, 5, 5, device=device)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=False)
    for offsets in (torch.tensor([[0, 0, 0]]), torch.tensor([[3, 1, 2]])):
        expect_equal(compiled(volume, offsets),
                     assemble_input_reference(volume, offsets, None, (2, 2, 2), (5, 5, 5)), device, backend)


# -- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKENDS)
def test_bad_inputs_name_the_problem(device, backend):
    volume = torch.randn(2, 4, 8, 8, 8, device=device)

    def call(*args, **kwargs):
        return assemble_input(*args, backend=backend, **kwargs)

    with pytest.raises(ValueError, match=r"patch 1 of shape \(4, 4, 4\) at offset \(5, 0, 0\) does not fit"):
        call(volume, [[0, 0, 0], [5, 0, 0]], None, (4, 4, 4))
    with pytest.raises(ValueError, match=r"at offset \(0, -1, 0\) does not fit"):
        call(volume, [[0, -1, 0], [0, 0, 0]], None, (4, 4, 4))
    with pytest.raises(ValueError, match="coord_shape"):
        call(volume, [[0, 0, 4], [0, 0, 0]], None, (4, 4, 4), coord_shape=(8, 8, 6))
    with pytest.raises(TypeError, match="offsets must be integers"):
        call(volume, [[0, 0, 0.5], [0, 0, 0]], None, (4, 4, 4))
    with pytest.raises(TypeError, match="offsets must hold integers, got dtype torch.float32"):
        call(volume, torch.zeros(2, 3), None, (4, 4, 4))
    with pytest.raises(ValueError, match=r"offsets must be \(3,\) or \(B, 3\)"):
        call(volume, torch.zeros(2, 2, dtype=torch.int64), None, (4, 4, 4))
    with pytest.raises(ValueError, match="volume has batch 2 but offsets give 3 patches"):
        call(volume, [[0, 0, 0]] * 3, None, (4, 4, 4))
    with pytest.raises(ValueError, match=r"out has shape \(2, 7, 4, 4, 3\), expected \(2, 8, 4, 4, 4\)"):
        call(volume, [[0, 0, 0]] * 2, torch.randn(2, 1, 4, 4, 4, device=device), (4, 4, 4),
             out=torch.empty(2, 7, 4, 4, 3, device=device))
    with pytest.raises(ValueError, match=r"out has shape \(2, 6, 4, 4, 4\), expected \(2, 7, 4, 4, 4\) \(or more"):
        call(volume, [[0, 0, 0]] * 2, None, (4, 4, 4), out=torch.empty(2, 6, 4, 4, 4, device=device))
    with pytest.raises(TypeError, match="out has dtype torch.float16"):
        call(volume, [[0, 0, 0]] * 2, None, (4, 4, 4), out=torch.empty(2, 7, 4, 4, 4, device=device).half())
    with pytest.raises(ValueError, match=r"x_t has shape \(2, 1, 4, 4, 3\)"):
        call(volume, [[0, 0, 0]] * 2, torch.randn(2, 1, 4, 4, 3, device=device), (4, 4, 4))
    with pytest.raises(ValueError, match="x_t is on meta but volume is on"):
        call(volume, [[0, 0, 0]] * 2, torch.empty(2, 1, 4, 4, 4, device="meta"), (4, 4, 4))
    with pytest.raises(ValueError, match="out is on meta but volume is on"):
        call(volume, [[0, 0, 0]] * 2, None, (4, 4, 4), out=torch.empty(2, 7, 4, 4, 4, device="meta"))
    with pytest.raises(TypeError, match="volume has dtype int64"):
        call(torch.ones(1, 1, 4, 4, 4, dtype=torch.int64, device=device), [0, 0, 0], None, (2, 2, 2))


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_ops_check_their_own_inputs(device, backend):
    # torch.ops.patchddm(_triton).assemble_input* are public too: they refuse bad input themselves.
    ops = torch.ops.patchddm_triton if backend == "triton" else torch.ops.patchddm
    error = (ValueError, TypeError) if backend == "triton" else RuntimeError
    volume = torch.randn(1, 2, 6, 6, 6, device=device)
    offsets = torch.tensor([[0, 0, 0], [2, 3, 3]])
    with pytest.raises(error, match=r"offsets must be a CPU int64 tensor of shape \(B, 3\)"):
        ops.assemble_input(volume, offsets.float(), None, [3, 3, 3], [6, 6, 6])
    with pytest.raises(error, match=r"offsets must be a CPU int64 tensor of shape \(B, 3\)"):
        ops.assemble_input(volume, offsets[:, :2], None, [3, 3, 3], [6, 6, 6])
    with pytest.raises(error, match="patch 1 .* does not fit"):
        ops.assemble_input(volume, offsets, None, [3, 4, 3], [6, 6, 6])
    with pytest.raises(error, match="patch 1 .* does not fit"):
        ops.assemble_input(volume, -offsets, None, [3, 3, 3], [6, 6, 6])
    with pytest.raises(error, match="coord_shape"):
        ops.assemble_input(volume, offsets, None, [3, 3, 3], [6, 6, 0])
    with pytest.raises(error, match="volume has batch 1 but offsets give 3 patches|volume has batch"):
        ops.assemble_input(torch.randn(2, 2, 6, 6, 6, device=device), torch.zeros(3, 3, dtype=torch.int64),
                           None, [3, 3, 3], [6, 6, 6])
    with pytest.raises(error, match="x_t has shape"):
        ops.assemble_input(volume, offsets, torch.randn(2, 1, 3, 3, 2, device=device), [3, 3, 3], [6, 6, 6])
    with pytest.raises(error, match="out has shape"):
        ops.assemble_input_out(volume, offsets, None, [3, 3, 3], [6, 6, 6], torch.empty(2, 4, 3, 3, 3, device=device))
    with pytest.raises(error, match="out has dtype"):
        ops.assemble_input_out(volume, offsets, None, [3, 3, 3], [6, 6, 6],
                               torch.empty(2, 5, 3, 3, 3, device=device, dtype=torch.float64))
    if backend != "triton":  # ATen's overlap checks: parallel writers must not share memory
        with pytest.raises(RuntimeError, match="single memory location"):
            ops.assemble_input_out(volume, offsets, None, [3, 3, 3], [6, 6, 6],
                                   torch.empty(1, 5, 3, 3, 3, device=device).expand(2, 5, 3, 3, 3))
