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
    """Speedup per configuration and batch size, and acceptance per draft position; PNG path."""
    json_path = Path(json_path)
    report: dict[str, Any] = json.loads(json_path.read_text())
    configs = {n: e for n, e in report["configs"].items() if "by_batch_size" in e}
    baseline = {r["batch_size"]: r["tokens_per_second"] for r in configs["none"]["by_batch_size"]}
    sizes = sorted(baseline)
    names = list(configs)

    figure, (speed, accept) = plt.subplots(1, 2, figsize=(15, 6), width_ratios=(3, 2))
    width = 0.8 / len(sizes)
    for i, size in enumerate(sizes):
        values = [_row(configs[n], size)["tokens_per_second"] / baseline[size] for n in names]
        bars = speed.bar(
            [x + i * width for x in range(len(names))], values, width, label=f"batch {size}"
        )
        for bar, name in zip(bars, names):
            if _row(configs[name], size).get("lossless") is False:
                bar.set_hatch("//")
    speed.axhline(1.0, color="black", linewidth=0.8)
    speed.set_xticks([x + width * (len(sizes) - 1) / 2 for x in range(len(names))])
    speed.set_xticklabels(names, rotation=45, ha="right")
    speed.set_ylabel("tokens/s relative to no speculation")
    speed.set_title("Speedup (hatched: greedy output differs from no speculation)")
    speed.legend()

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


def _row(entry: dict[str, Any], batch_size: int) -> dict[str, Any]:
    return next(r for r in entry["by_batch_size"] if r["batch_size"] == batch_size)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(plot_results(path))
