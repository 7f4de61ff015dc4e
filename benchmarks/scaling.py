"""How time and peak memory grow with the volume size and the ensemble size, for sampling and
training, ours against the baseline pattern; and from it, the largest cubic volume each
sampling mode fits on a 24, 40 or 80 GiB GPU.

Measured points (real runs): one DDIM sampling step of the whole volume (benchmarks.workloads
.sampling_step) and one training step (training_step), per size and per ensemble size
(members batched) or patch batch. Memory of a point: on a GPU torch.cuda.max_memory_allocated
over one step minus what was allocated before the workload was built (so weights, buffers and
optimizer state count); on the CPU the live-tensor bytes of one step plus what the workload
holds (benchmarks.memory.tensor_peak_bytes: exact and repeatable, where peak RSS varies by tens
of percent from run to run with the C allocator).

Counted points (no arithmetic): the paper's U-Net at 64^3 .. 512^3, its live tensors counted
on fake tensors (benchmarks.memory.unet_pass_bytes), plus the buffers the sampling step holds
(sampling_step_bytes). That is how a CPU says what a GPU needs.

Largest volume: per mode, peak = a + b * voxels fitted by least squares; the largest edge s
with a + b s^3 <= capacity - 1 GiB (CUDA context and library workspaces), and the largest
size the paper's network accepts (a multiple of 64; others are padded up to one). On a GPU
the fit is of measured peaks within the measured range; on the CPU it is an extrapolation of
the counted per-voxel bytes, which do not see allocator fragmentation (expect a few percent
more on a real GPU).

    python -m benchmarks.scaling                 # this machine's default plan, to .benchmarks/
    python -m benchmarks.scaling --out DIR --sizes 64,128,192,256
    pytest benchmarks/test_scaling.py --benchmark-only     # the same points as benchmarks
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from dataclasses import asdict, dataclass, field

import torch

GIB = 2**30
CAPACITIES_GIB = (24, 40, 80)
RESERVE_BYTES = 1 * GIB
FLOAT32 = 4


@dataclass
class Point:
    """One measured (or counted) configuration."""
    mode: str                   # "sample" (one DDIM step) or "train" (one training step)
    variant: str                # "baseline" or "ours"
    precision: str              # "float32" or "bfloat16"
    preset: str                 # U-Net preset
    size: int                   # edge of the cubic volume / patch
    members: int                # ensemble members batched (sample) or patches (train)
    peak_bytes: int | None      # None: did not fit
    seconds: float | None       # median seconds per step (None: counted, not run)
    device: str
    memory_source: str          # how peak_bytes was obtained
    note: str = ""

    @property
    def voxels(self) -> int:
        return self.members * self.size**3

    @property
    def label(self) -> str:
        return f"{self.mode} {self.variant} {self.precision}"


@dataclass
class Plan:
    """Which points a run measures."""
    preset: str
    sample_sizes: tuple
    train_sizes: tuple
    ensemble_size: int               # volume edge of the ensemble series
    members: tuple                   # ensemble sizes (sampling)
    batches: tuple                   # patch batches (training, at train_sizes[0])
    sample_modes: tuple              # (variant, precision)
    train_modes: tuple
    rounds: int
    counted_sizes: tuple = field(default=tuple(range(64, 513, 64)))


def default_plan(device: str, paper_scale: bool = False, sizes=None) -> Plan:
    """The points of this device's study; sizes (or PATCHDDM_SCALING_SIZES=64,128,...) replaces
    the sampling sizes."""
    if torch.device(device).type == "cuda":
        plan = Plan(preset="paper", sample_sizes=(64, 128, 192, 256, 320, 384, 448), train_sizes=(64, 128, 192),
                    ensemble_size=128, members=(1, 2, 4), batches=(1, 2),
                    sample_modes=(("baseline", "float32"), ("ours", "float32"), ("ours", "bfloat16")),
                    train_modes=(("baseline", "bfloat16"), ("ours", "bfloat16")), rounds=2)
    elif paper_scale:  # the paper's network on a CPU: slow, a few points only
        plan = Plan(preset="paper", sample_sizes=(64, 128), train_sizes=(64,), ensemble_size=64, members=(1, 2),
                    batches=(1,), sample_modes=(("baseline", "float32"), ("ours", "float32")),
                    train_modes=(("baseline", "float32"), ("ours", "float32")), rounds=1)
    else:
        plan = Plan(preset="small", sample_sizes=(16, 32, 48), train_sizes=(16, 32), ensemble_size=16,
                    members=(1, 2, 4), batches=(1, 2), sample_modes=(("baseline", "float32"), ("ours", "float32")),
                    train_modes=(("baseline", "float32"), ("ours", "float32")), rounds=2)
    sizes = sizes or [int(s) for s in os.environ.get("PATCHDDM_SCALING_SIZES", "").split(",") if s.strip()]
    if sizes:
        plan.sample_sizes = tuple(sizes)
    return plan


def plan_cases(plan: Plan) -> list[dict]:
    """Every point of a plan as keyword arguments of measure_point (without device)."""
    cases = []
    for size in plan.sample_sizes:
        for variant, precision in plan.sample_modes:
            cases.append(dict(mode="sample", variant=variant, precision=precision, size=size, members=1))
    for members in plan.members:
        if members == 1 and plan.ensemble_size in plan.sample_sizes:
            continue
        for variant, precision in plan.sample_modes:
            cases.append(dict(mode="sample", variant=variant, precision=precision, size=plan.ensemble_size,
                              members=members))
    for size in plan.train_sizes:
        for variant, precision in plan.train_modes:
            cases.append(dict(mode="train", variant=variant, precision=precision, size=size, members=1))
    for batch in plan.batches:
        if batch == 1:
            continue
        for variant, precision in plan.train_modes:
            cases.append(dict(mode="train", variant=variant, precision=precision, size=plan.train_sizes[0],
                              members=batch))
    for case in cases:
        case["preset"] = plan.preset
    return cases


# -- one point -------------------------------------------------------------------------------

def build(mode: str, variant: str, precision: str, preset: str, size: int, members: int, device: str):
    from benchmarks import workloads

    if mode == "sample":
        return workloads.sampling_step(variant, preset, size, members=members, precision=precision, device=device)
    return workloads.training_step(variant, preset, size, batch=members, precision=precision, device=device)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def peak_of(mode, variant, precision, preset, size, members, device) -> tuple[int, object, str]:
    """(peak bytes of one step, the workload's run, how it was measured) for a fresh workload."""
    from benchmarks.memory import tensor_peak_bytes

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        run = build(mode, variant, precision, preset, size, members, device)
        run()  # warm-up: lazy state (optimizer moments, cuDNN plans)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, run, "cuda max_memory_allocated"
    run = build(mode, variant, precision, preset, size, members, device)
    return tensor_peak_bytes(run)["total"], run, "live tensors (tracker)"


def measure_point(mode, variant, precision, preset, size, members, device, rounds: int = 3) -> Point:
    """Peak memory and median step time of one configuration (peak None when it does not fit)."""
    from benchmarks.workloads import time_call

    try:
        peak, run, source = peak_of(mode, variant, precision, preset, size, members, device)
        seconds = sorted(time_call(run, device, rounds=rounds, warmup=0))[rounds // 2]
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        return Point(mode, variant, precision, preset, size, members, None, None, device, "out of memory", "OOM")
    finally:
        run = None
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return Point(mode, variant, precision, preset, size, members, peak, seconds, device, source)


# -- counted points (fake tensors) -----------------------------------------------------------

def sampling_step_bytes(variant: str, preset: str, size: int, members: int = 1, precision: str = "float32") -> int:
    """Bytes one sampling step (benchmarks.workloads.sampling_step) needs: the U-Net pass
    counted on fake tensors, its weights, and the float32 tensors the step keeps:
    ours: the image (4 channels), the model-input buffer (8 per member) and x0 (1 per member);
    baseline: the image, the coordinates (3), x_t (1 per member) and the torch.cat input
    (8 per member), alive while the network runs."""
    from benchmarks.memory import unet_pass_bytes

    voxels = size**3
    unet = unet_pass_bytes(preset, (size,) * 3, members, variant, precision)
    channels = 4 + 9 * members if variant == "ours" else 4 + 3 + members + 8 * members
    return unet["transient"] + unet["weights"] + channels * voxels * FLOAT32


def counted_points(preset: str = "paper", sizes=tuple(range(64, 513, 64)),
                   modes=(("baseline", "float32"), ("ours", "float32"), ("baseline", "bfloat16"),
                          ("ours", "bfloat16"))) -> list[Point]:
    points = []
    for variant, precision in modes:
        for size in sizes:
            peak = sampling_step_bytes(variant, preset, size, 1, precision)
            points.append(Point("sample", variant, precision, preset, size, 1, peak, None, "fake",
                                "fake tensors (counted)"))
    return points


# -- fits and capacities -------------------------------------------------------------------

def fit_linear(points: list[Point]) -> tuple[float, float]:
    """Least-squares (a, b) of peak_bytes = a + b * voxels over the points that fitted."""
    xs = [p.voxels for p in points if p.peak_bytes is not None]
    ys = [p.peak_bytes for p in points if p.peak_bytes is not None]
    if len(set(xs)) < 2:
        raise ValueError(f"a fit needs at least two sizes, got voxels {sorted(set(xs))}")
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return mean_y - b * mean_x, b


def largest_cube(a: float, b: float, capacity_bytes: float, multiple: int = 1) -> tuple[float, int]:
    """(largest edge s with a + b s^3 <= capacity_bytes, the largest multiple of `multiple` <= s)."""
    if b <= 0:
        raise ValueError(f"memory must grow with the volume (slope {b} bytes per voxel)")
    room = capacity_bytes - a
    if room <= 0:
        return 0.0, 0
    edge = (room / b) ** (1 / 3)
    return edge, int(edge // multiple) * multiple


def capacity_table(points: list[Point], multiple: int, capacities_gib=CAPACITIES_GIB,
                   reserve_bytes: int = RESERVE_BYTES) -> list[dict]:
    """Per sampling mode (single member): the fit and the largest cube per GPU capacity."""
    rows = []
    groups: dict[tuple, list[Point]] = {}
    for p in points:
        if p.mode == "sample" and p.members == 1:
            groups.setdefault((p.variant, p.precision, p.memory_source), []).append(p)
    for (variant, precision, source), group in sorted(groups.items()):
        if len({p.size for p in group if p.peak_bytes is not None}) < 2:
            continue
        a, b = fit_linear(group)
        row = dict(variant=variant, precision=precision, source=source, fixed_mib=round(a / 2**20, 1),
                   bytes_per_voxel=round(b, 1), at_256_gib=round((a + b * 256**3) / GIB, 2))
        for capacity in capacities_gib:
            edge, usable = largest_cube(a, b, capacity * GIB - reserve_bytes, multiple)
            row[f"{capacity}GiB_edge"] = round(edge, 1)
            row[f"{capacity}GiB_largest"] = usable
        rows.append(row)
    return rows


def format_capacity(rows: list[dict], capacities_gib=CAPACITIES_GIB) -> str:
    header = ["mode", "memory from", "bytes/voxel", "fixed MiB", "256^3 GiB"] + [f"{c} GiB" for c in capacities_gib]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [f"{r['variant']} {r['precision']}", r["source"], f"{r['bytes_per_voxel']:.0f}", f"{r['fixed_mib']:.0f}",
                 f"{r['at_256_gib']:.1f}"]
        cells += [f"{r[f'{c}GiB_largest']}^3 (edge {r[f'{c}GiB_edge']:.0f})" for c in capacities_gib]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


# -- output ---------------------------------------------------------------------------------

def write_csv(points: list[Point], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["mode", "variant", "precision", "preset", "size", "members", "voxels", "peak_bytes",
                         "peak_mib", "seconds", "device", "memory_source", "note"])
        for p in points:
            writer.writerow([p.mode, p.variant, p.precision, p.preset, p.size, p.members, p.voxels,
                             p.peak_bytes if p.peak_bytes is not None else "",
                             round(p.peak_bytes / 2**20, 2) if p.peak_bytes is not None else "",
                             f"{p.seconds:.6f}" if p.seconds is not None else "", p.device, p.memory_source, p.note])


def plot(points: list[Point], path: str, capacity_rows: list[dict] | None = None) -> bool:
    """Time and memory against voxels (and ensemble size), one line per mode; False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    measured = [p for p in points if p.seconds is not None]
    counted = [p for p in points if p.memory_source.startswith("fake")]
    figure, axes = plt.subplots(1, 3, figsize=(17, 5))
    series: dict[tuple, list[Point]] = {}
    ensemble_edges = {(p.mode, p.size) for p in measured if p.members > 1}
    for p in measured:
        if p.members > 1 or (p.mode, p.size) in ensemble_edges:  # the x1 point starts the ensemble line
            series.setdefault(("members", p.label, p.size), []).append(p)
        if p.members == 1:
            series.setdefault(("size", p.label, None), []).append(p)
    for (kind, label, edge), group in sorted(series.items(), key=lambda item: str(item[0])):
        group.sort(key=lambda p: p.voxels)
        style = "-o" if kind == "size" else "--s"
        name = label if kind == "size" else f"{label}, {edge}^3 x members"
        axes[0].plot([p.voxels for p in group], [p.seconds for p in group], style, label=name)
        axes[1].plot([p.voxels for p in group], [p.peak_bytes / GIB for p in group], style, label=name)
    by_mode: dict[str, list[Point]] = {}
    for p in counted:
        by_mode.setdefault(f"{p.variant} {p.precision}", []).append(p)
    for label, group in sorted(by_mode.items()):
        group.sort(key=lambda p: p.size)
        axes[2].plot([p.size for p in group], [p.peak_bytes / GIB for p in group], "-o", label=label)
    for capacity in CAPACITIES_GIB:
        axes[2].axhline(capacity, color="grey", linewidth=0.8, linestyle=":")
        axes[2].text(axes[2].get_xlim()[0] if counted else 0, capacity, f" {capacity} GiB", va="bottom", fontsize=8)
    device = measured[0].device if measured else "?"
    preset = measured[0].preset if measured else "?"
    for axis, title, ylabel in ((axes[0], f"step time ({preset} U-Net, {device})", "seconds per step"),
                                (axes[1], f"peak memory ({preset} U-Net, {device})", "GiB")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("voxels (members x size^3)")
        axis.set_ylabel(ylabel)
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        if measured:
            axis.legend(fontsize=7)
    axes[2].set_title("paper U-Net, one sampling step: counted on fake tensors")
    axes[2].set_xlabel("volume edge (voxels)")
    axes[2].set_ylabel("GiB")
    axes[2].grid(True, alpha=0.3)
    if counted:
        axes[2].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_report(points: list[Point], out_dir: str, device_type: str) -> dict:
    """CSV, PNG, capacity table (JSON and markdown) of a study; returns the file paths and the
    capacity rows."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"scaling-{device_type}")
    write_csv(points, stem + ".csv")
    measured_rows = capacity_table([p for p in points if p.device != "fake" and p.preset == "paper"], 64)
    counted_rows = capacity_table([p for p in points if p.device == "fake"], 64)
    rows = measured_rows + counted_rows
    with open(stem + "-capacity.json", "w") as f:
        json.dump(dict(rows=rows, reserve_bytes=RESERVE_BYTES, capacities_gib=CAPACITIES_GIB,
                       points=[asdict(p) for p in points]), f, indent=1)
    text = format_capacity(rows)
    with open(stem + "-capacity.md", "w") as f:
        f.write(text + "\n")
    plotted = plot(points, stem + ".png")
    return dict(csv=stem + ".csv", png=stem + ".png" if plotted else None, capacity_md=stem + "-capacity.md",
                capacity=rows, table=text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.environ.get("OUT") or ".benchmarks")
    parser.add_argument("--paper-scale", action="store_true")
    parser.add_argument("--sizes", default=None, help="sampling sizes, e.g. 64,128,256")
    parser.add_argument("--counted-only", action="store_true", help="only the fake-tensor counts (seconds)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    plan = default_plan(args.device, args.paper_scale, sizes)
    points = []
    if not args.counted_only:
        failed: set = set()
        for case in plan_cases(plan):
            key = (case["mode"], case["variant"], case["precision"], case["members"] > 1)
            if key in failed:  # a smaller size did not fit: larger ones will not either
                continue
            point = measure_point(device=args.device, rounds=plan.rounds, **case)
            if point.peak_bytes is None:
                failed.add(key)
            points.append(point)
            print(f"{point.label:28s} {point.size:4d}^3 x{point.members} "
                  f"{'OOM' if point.peak_bytes is None else f'{point.peak_bytes / 2**20:10.1f} MiB {point.seconds:8.3f} s'}",
                  flush=True)
    points += counted_points("paper", plan.counted_sizes)
    report = write_report(points, args.out, torch.device(args.device).type)
    print(report["table"])
    print(f"wrote {report['csv']}, {report['png']}, {report['capacity_md']}")


if __name__ == "__main__":
    main()
