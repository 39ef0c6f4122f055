"""The loss-curve PNG written at the end of training, from the CSV log."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path


def read_log(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with Path(path).open() as f:
        for row in csv.DictReader(f):
            series[row["key"]].append((int(row["step"]), float(row["value"])))
    return dict(series)


def plot_losses(curves: dict[str, str | Path], out: str | Path, title: str = "training loss") -> Path:
    """One panel per loss component; one line per run (`curves`: label -> log.csv)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = {label: read_log(p) for label, p in curves.items() if Path(p).is_file()}
    keys = sorted({k for s in logs.values() for k in s if k == "loss" or k.startswith("loss_")})
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4 * max(1, len(keys)), 3.2), squeeze=False)
    colors = {label: f"C{i}" for i, label in enumerate(logs)}  # one colour per run in every panel
    for ax, key in zip(axes[0], keys):
        for label, series in logs.items():
            if key in series:
                steps, values = zip(*series[key])
                ax.plot(steps, values, label=label, color=colors[label])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
