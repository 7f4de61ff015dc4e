"""A training step, ours against the original's pattern, side by side (the paper preset).

One process, the cases interleaved round after round (a change in the machine's load hits all
alike), one warm-up step each, the fastest round kept; wall and process CPU seconds. Cases:

  original float32         the plain U-Net, torch.cat input, eager noising (the original)
  original bf16 autocast   the same under torch.autocast(bfloat16)
  ours float32             the fused U-Net, checkpoint "cheap" (the trainer's paper preset),
                           without recomputation ("off"), and in channels_last_3d
  ours auto                the trainer's automatic settings for this device (fast_settings:
                           bfloat16 autocast and channels_last_3d on a CPU with native bf16)
  ours auto, oneDNN weight gradient
                           the same with every convolution's weight gradient from oneDNN
                           (nn/conv.py's weight_grad_choice = "onednn"): what our bfloat16
                           weight-gradient kernel adds
  ours auto, checkpoint off  the same without recomputation

    python -m benchmarks.train_step --size 64 --rounds 3
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.workloads import training_step


def _case(variant: str, precision: str, checkpoint: str, channels_last: bool, size: int, preset: str,
          weight_grad: str = "auto"):
    from patchddm_fast.nn import conv

    # The original draws the noise ours draws (philox), so that their losses can be compared.
    step = training_step(variant, preset, size, 1, precision, checkpoint=checkpoint, baseline_noise="philox")
    if channels_last:
        model = step.held[0]
        model.channels_last = True
        model.to(memory_format=torch.channels_last_3d)

    def run():
        conv.weight_grad_choice = weight_grad
        try:
            return step()
        finally:
            conv.weight_grad_choice = "auto"
    return run


def main(argv=None) -> None:
    from patchddm_fast.fast_settings import fast_settings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="paper", help="paper (default) or small")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    fast = fast_settings(torch.device("cpu"))
    auto_precision = "bfloat16" if fast.precision == "bf16" else "float32"
    cases = {
        "original float32": ("baseline", "float32", "off", False),
        "original bf16 autocast": ("baseline", "bfloat16", "off", False),
        "ours float32 (checkpoint off)": ("ours", "float32", "off", False),
        "ours float32 (cheap)": ("ours", "float32", "cheap", False),
        "ours float32 (cheap, channels_last)": ("ours", "float32", "cheap", True),
        f"ours auto ({fast.precision}, {'channels_last' if fast.channels_last else 'contiguous'}, cheap)":
            ("ours", auto_precision, "cheap", fast.channels_last),
        "ours auto, oneDNN weight gradient": ("ours", auto_precision, "cheap", fast.channels_last, "onednn"),
        "ours auto, checkpoint off": ("ours", auto_precision, "off", fast.channels_last),
    }
    runs = {name: _case(*spec[:4], args.size, args.preset, *spec[4:]) for name, spec in cases.items()}
    # Checked first: the warm-up step's loss (same weights, data and noise) of every float32
    # case against the original's: float32 rounding through the network and the fused norms
    # may move it in the last bits (equal to the bit on the small preset at 16^3; 1e-4 leaves
    # room for other sizes and CPUs), a wrong input or norm by order 1e-2 or more.
    losses = {name: float(run()) for name, run in runs.items()}
    reference = losses["original float32"]
    for name, spec in cases.items():
        if spec[1] == "float32" and abs(losses[name] - reference) > 1e-4 * abs(reference):
            raise RuntimeError(f"{name}: loss {losses[name]} differs from the original's {reference}")
    best = {name: (float("inf"), float("inf")) for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if wall < best[name][0]:
                best[name] = (wall, cpu)
    base, base_bf16 = best["original float32"][0], best["original bf16 autocast"][0]
    print(f"{args.preset} preset, one {args.size}^3 patch, {torch.get_num_threads()} threads, fastest of "
          f"{args.rounds} interleaved rounds")
    print("| run | wall s (CPU s) | original float32 / run | original bf16 / run |")
    print("|---|---|---|---|")
    for name, (wall, cpu) in best.items():
        print(f"| {name} | {wall:.2f} ({cpu:.2f}) | {base / wall:.2f}x | {base_bf16 / wall:.2f}x |")
    return best, losses


if __name__ == "__main__":
    main()
