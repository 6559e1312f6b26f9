#!/usr/bin/python3
"""Draws the full-path benchmark's results (latest.json) as one PNG.

Usage: /usr/bin/python3 bench/chart.py RESULTS.json OUT.png
Needs Debian's python3-matplotlib (./scripts/bench installs it).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [
    ("Throughput (Gbit/s, higher is better)",
     [("up1", "→ 1"), ("up8", "→ 8"), ("up64", "→ 64"),
      ("down1", "← 1"), ("down8", "← 8"), ("down64", "← 64")], False),
    ("Connect to first byte (ms, lower is better)", [("p50", "p50"), ("p99", "p99")], True),
    ("New connections per second (higher is better)", [("rate", "conn/s")], False),
    ("Memory per idle connection (KiB, lower is better)",
     [("mem1k", "first count"), ("mem10k", "second count"), ("mem50k", "third count")], False),
]


def main(src, dst):
    with open(src) as f:
        r = json.load(f)
    paths = r["paths"]
    holds = r.get("holds", [])
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    colors = ["#888888", "#c9a227", "#4f81bd", "#9b59b6", "#2e8b57"]
    for ax, (title, metrics, log) in zip(axes.flat, PANELS):
        metrics = [m for m in metrics if any(m[0] in p["values"] for p in paths)]
        labels = []
        for key, label in metrics:
            if key.startswith("mem") and holds:
                i = ["mem1k", "mem10k", "mem50k"].index(key)
                label = f"{holds[i]} held" if i < len(holds) else label
            labels.append(label)
        width = 0.8 / len(paths)
        for i, p in enumerate(paths):
            xs, ys = [], []
            for j, (key, _) in enumerate(metrics):
                if key in p["values"]:
                    xs.append(j + i * width - 0.4 + width / 2)
                    ys.append(p["values"][key])
            ax.bar(xs, ys, width, label=p["title"], color=colors[i % len(colors)])
        ax.set_xticks(range(len(metrics)))
        ax.set_xticklabels(labels)
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"hybridlink full path vs reference tunnels ({r['mode']} run, {r['date']})\n"
                 f"{r['machine']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(dst, dpi=90)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
