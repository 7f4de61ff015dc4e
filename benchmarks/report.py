"""A compact table from pytest-benchmark JSON files (or benchmarks/fallback.py's): one row per
group and per implementation of ours, beside the group's eager / baseline and torch.compile
times, their ratio, and the rate the benchmark recorded (GB/s, TFLOP/s, patches/s, ...).

    python -m benchmarks.report results.json [more.json ...] [--card "NVIDIA H200"] [--markdown]

Within a group, a benchmark whose name says "eager", "baseline" or "original" is the eager
column (the float32 baseline first), one saying "compile" the compile column, "copy" and the device peaks
are references, everything else is a row of ours. ratio = eager time / ours time (> 1: ours
is faster); mem = ours' peak memory / eager's where both were recorded.
"""

from __future__ import annotations

import argparse
import json
import re

RATE_KEYS = (("GBps", "GB/s"), ("bandwidth_GBps", "GB/s"), ("TFLOPs", "TFLOP/s"), ("patches_per_s", "patch/s"),
             ("steps_per_s", "step/s"))


def _name(bench: dict) -> str:
    extra = bench.get("extra_info") or {}
    if extra.get("name"):
        return str(extra["name"])
    match = re.search(r"\[(.*)\]$", bench.get("name", ""))
    return match.group(1) if match else bench.get("name", "?")


def _role(name: str) -> str:
    lowered = name.lower()
    if "compile" in lowered:
        return "compile"
    if "eager" in lowered or "baseline" in lowered or "original" in lowered:
        return "eager"
    if lowered.endswith("copy") or lowered.startswith("copy") or lowered.startswith("matmul"):
        return "reference"
    return "ours"


def _pick_eager(candidates: list[dict]) -> dict | None:
    if not candidates:
        return None
    preferred = [b for b in candidates if _name(b).split("[")[0].endswith(("float32", "eager", "baseline"))]
    return (preferred or candidates)[0]


def _seconds(bench: dict) -> float:
    return bench["stats"]["median"]


def _rate(bench: dict) -> str:
    extra = bench.get("extra_info") or {}
    for key, unit in RATE_KEYS:
        if key in extra:
            fraction = extra.get("fraction_of_peak")
            suffix = f" ({fraction:.0%} of peak)" if isinstance(fraction, (int, float)) else ""
            return f"{extra[key]:.3g} {unit}{suffix}"
    return ""


def _format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def rows(documents: list[dict]) -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for document in documents:
        for bench in document.get("benchmarks", []):
            groups.setdefault(str(bench.get("group")), []).append(bench)
    table = []
    for group, benches in groups.items():
        eager = _pick_eager([b for b in benches if _role(_name(b)) == "eager"])
        compiled = next((b for b in benches if _role(_name(b)) == "compile"), None)
        for bench in benches:
            role = _role(_name(bench))
            if role == "ours" or (role == "reference" and group.startswith("limits peaks")):
                ours_s = _seconds(bench)
                eager_s = _seconds(eager) if eager is not None else None
                ours_peak = (bench.get("extra_info") or {}).get("peak_mib")
                eager_peak = (eager.get("extra_info") or {}).get("peak_mib") if eager is not None else None
                table.append(dict(
                    group=group, ours=_name(bench), ours_s=ours_s, eager_s=eager_s,
                    compile_s=_seconds(compiled) if compiled is not None else None,
                    ratio=eager_s / ours_s if eager_s else None,
                    memory=(ours_peak / eager_peak if isinstance(ours_peak, (int, float)) and eager_peak
                            and eager_peak > 0 and ours_peak > 0 else None),
                    rate=_rate(bench)))
            elif role == "eager" and bench is eager and not any(_role(_name(b)) == "ours" for b in benches):
                table.append(dict(group=group, ours="-", ours_s=None, eager_s=_seconds(bench), compile_s=None,
                                  ratio=None, memory=None, rate=_rate(bench)))
    return table


def format_table(table: list[dict], card: str) -> str:
    header = ["card", "benchmark (group)", "ours", "ours time", "eager/baseline", "compile", "ratio", "mem", "rate"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table:
        cells = [card, r["group"], r["ours"], _format_seconds(r["ours_s"]), _format_seconds(r["eager_s"]),
                 _format_seconds(r["compile_s"]), f"{r['ratio']:.2f}x" if r["ratio"] else "-",
                 f"{r['memory']:.2f}" if r["memory"] else "-", r["rate"] or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merge(paths: list[str]) -> dict:
    """One document holding every benchmark of the files (machine_info of the first)."""
    documents = []
    for path in paths:
        with open(path) as f:
            documents.append(json.load(f))
    merged = dict(machine_info=documents[0].get("machine_info", {}) if documents else {}, benchmarks=[])
    for document in documents:
        merged["benchmarks"].extend(document.get("benchmarks", []))
    return merged


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="compact table of pytest-benchmark results")
    parser.add_argument("json", nargs="+")
    parser.add_argument("--card", default=None, help="device name for the first column (default: from the JSON)")
    parser.add_argument("--merged", default=None, help="also write all benchmarks into this one JSON file")
    args = parser.parse_args(argv)
    merged = merge(args.json)
    if args.merged:
        with open(args.merged, "w") as f:
            json.dump(merged, f, indent=1)
    info = merged.get("machine_info", {})
    card = args.card or (info.get("cpu") or {}).get("brand_raw") or info.get("node") or "?"
    print(format_table(rows([merged]), card))


if __name__ == "__main__":
    main()
