"""Draw a benchmark's PNG from its JSON (benchmarks/run_bench.py), and from nothing else.

The figure is a function of the JSON file alone, so it can always be traced to its run, machine
and versions, and redrawn later:  python benchmarks/plot.py benchmarks/results/NAME.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on benchmark machines
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_results(json_path: str | Path) -> Path:
    """Speedup per configuration and batch size, acceptance per draft position, and where the
    run measured it, time to first token; PNG path."""
    json_path = Path(json_path)
    report: dict[str, Any] = json.loads(json_path.read_text())
    configs = {n: e for n, e in report["configs"].items() if "by_batch_size" in e}
    baseline = {r["batch_size"]: r["tokens_per_second"] for r in configs["none"]["by_batch_size"]}
    sizes = sorted(baseline)
    names = list(configs)

    with_first_token = any(
        r.get("time_to_first_token_seconds") for e in configs.values() for r in e["by_batch_size"]
    )
    panels = 3 if with_first_token else 2
    figure, axes = plt.subplots(
        1, panels, figsize=(7.5 * panels, 6), width_ratios=(3, 2, 3)[:panels]
    )
    speed, accept = axes[0], axes[1]
    _bars(speed, configs, sizes, lambda row: row["tokens_per_second"] / baseline[row["batch_size"]])
    speed.axhline(1.0, color="black", linewidth=0.8)
    speed.set_ylabel("tokens/s relative to no speculation")
    speed.set_title("Speedup (hatched: greedy output differs from no speculation)")
    if with_first_token:
        first = axes[2]
        _bars(first, configs, sizes, _mean_first_token)
        first.set_ylabel("seconds (engine time, mean over requests)")
        first.set_title("Time to first token")

    smallest = sizes[0]
    for name in names:
        per_position = _row(configs[name], smallest)["acceptance_per_position"]
        if per_position:
            accept.plot(range(1, len(per_position) + 1), per_position, marker="o", label=name)
    accept.xaxis.set_major_locator(MaxNLocator(integer=True))
    accept.set_xlabel("draft position")
    accept.set_ylabel("accepted / drafted at this position")
    accept.set_ylim(0, 1.05)
    accept.set_title(f"Acceptance per position (batch {smallest})")
    if accept.lines:
        accept.legend(fontsize="small")

    machine, versions = report["machine"], report["versions"]
    figure.suptitle(
        f"{report['name']}: target {'/'.join(Path(report['settings']['target']).parts[-2:])}, "
        f"{report['settings']['max_tokens']} tokens/prompt, {machine['cpu']} "
        f"({machine['cores_usable']} cores, {report['settings']['omp_threads']} OMP thread(s)); "
        + ", ".join(f"{k} {v}" for k, v in versions.items()),
        fontsize="small",
    )
    figure.tight_layout()
    png_path = json_path.with_suffix(".png")
    figure.savefig(png_path, dpi=110)
    plt.close(figure)
    return png_path


def _bars(axis: Any, configs: dict[str, Any], sizes: list[int], value: Any) -> None:
    """One group of bars per configuration, one bar per batch size; hatched where lossy."""
    names = list(configs)
    width = 0.8 / len(sizes)
    for i, size in enumerate(sizes):
        rows = [_row(configs[n], size) for n in names]
        bars = axis.bar(
            [x + i * width for x in range(len(names))],
            [value(row) for row in rows],
            width,
            label=f"batch {size}",
        )
        for bar, row in zip(bars, rows):
            if row.get("lossless") is False:
                bar.set_hatch("//")
    axis.set_xticks([x + width * (len(sizes) - 1) / 2 for x in range(len(names))])
    axis.set_xticklabels(names, rotation=45, ha="right")
    axis.legend()


def _mean_first_token(row: dict[str, Any]) -> float:
    first = row.get("time_to_first_token_seconds")
    return first["mean"] if first else float("nan")


def _row(entry: dict[str, Any], batch_size: int) -> dict[str, Any]:
    return next(r for r in entry["by_batch_size"] if r["batch_size"] == batch_size)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(plot_results(path))
