"""Settings of the tiny training runs of these tests."""

from patchddm_fast.train import TrainConfig

# 24^3 phantoms (conftest.py), 16^3 patches of a 24^3 volume: the small network (4 levels, sizes
# multiple of 8) runs a step in tens of milliseconds.
PHANTOM_SHAPE = (24, 24, 24)
N_CASES = 5  # split 3 / 1 / 1


def tiny_config(data_dir, out_dir, **changes) -> TrainConfig:
    values = dict(preset="small", patch=16, volume=24, steps=4, batch_size=2, lr=1e-3, num_workers=0,
                  save_every=2, ema=0.9, grad_clip=1.0, seed=0, cache_bytes=2**26,
                  # fixed, so that the tests run the same on every machine (None would take the
                  # device's fastest settings; tests/train/test_config.py checks that)
                  precision="fp32", channels_last=False)
    values.update(changes)
    return TrainConfig(data_dir, out_dir, **values)
