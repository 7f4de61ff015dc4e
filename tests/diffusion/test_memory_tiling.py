import pytest
import torch

from patchddm_fast.diffusion.memory import LiveTensorBytes, forward_peak_bytes, probe_shape
from patchddm_fast.diffusion.tiling import Tiling, window_starts


def test_live_bytes_follow_tensor_lifetimes():
    x = torch.randn(1000)

    def work():
        a = x * 2               # 4000 bytes
        b = a.view(10, 100)     # a view: no new storage
        c = torch.cat([a, a])   # 8000 bytes, peak 12000 with a
        del a, b
        d = c + 1               # a is gone: c + d = 16000
        del c
        return d.sum()          # d + a 4-byte scalar

    assert forward_peak_bytes(work, external=[x]) == 16000
    with LiveTensorBytes(external=[x]) as tracker:
        kept = x + 1
        x.mul_(1.0)             # in place on an external tensor: not new memory
        del kept
    assert tracker.peak == 4000 and tracker.current == 0


def test_forward_peak_scales_with_voxels():
    conv = torch.nn.Conv3d(2, 5, 3, padding=1)
    peaks = []
    for n in (4, 8):
        x = torch.randn(1, 2, n, n, n)
        with torch.no_grad():
            peaks.append(forward_peak_bytes(lambda: torch.relu(conv(x)), external=[x, *conv.parameters()]))
    assert peaks[0] == 2 * 5 * 4**3 * 4 and peaks[1] == 8 * peaks[0]


def test_probe_shape():
    assert probe_shape((256, 256, 256), 64) == (64, 64, 64)
    assert probe_shape((16, 12, 8), 4) == (4, 4, 4)
    assert probe_shape((13, 3, 200), 1) == (4, 1, 50)
    assert probe_shape((32, 32, 32), 64) == (32, 32, 32)  # never larger than the volume


@pytest.mark.parametrize("size,window,overlap", [(16, 8, 2), (20, 8, 4), (16, 16, 4), (100, 32, 8), (9, 8, 7)])
def test_windows_cover_the_axis_with_overlap(size, window, overlap):
    starts = window_starts(size, window, overlap)
    assert starts[0] == 0 and starts[-1] + window == size
    for a, b in zip(starts, starts[1:]):
        assert window - (b - a) >= overlap - 1  # neighbours overlap (rounding may take one voxel)


def test_blend_weights_normalise_and_are_smooth():
    tiling = Tiling((16, 12, 20), (8, 8, 8), (4, 4, 4))
    assert len(tiling) == Tiling.count((16, 12, 20), (8, 8, 8), (4, 4, 4))
    total = torch.zeros(16, 12, 20)
    for _, slices, ramps in tiling.tiles:
        weight = tiling.weight(ramps)
        assert float(weight.min()) > 0 and float(weight.max()) <= 1
        total[slices] += weight
    # Default float32 tolerance (1.3e-6): a sum of at most 8 weights times its reciprocal.
    torch.testing.assert_close(total * tiling.inverse_total, torch.ones_like(total))
    assert float(total.min()) > 1e-3  # well conditioned
    # a window at the volume's corner keeps full weight at the volume's border
    _, _, ramps = tiling.tiles[0]
    assert float(ramps[0][0]) == 1 and float(ramps[0][-1]) < 1e-3


def test_bad_windows():
    with pytest.raises(ValueError, match="does not fit"):
        window_starts(8, 16, 2)
    with pytest.raises(ValueError, match="smaller than the window"):
        window_starts(16, 8, 8)
