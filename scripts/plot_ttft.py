"""Plot a bench_ttft.py JSON report: TTFT per case and prefix length, as a PNG.

    python scripts/plot_ttft.py ttft.json docs/img/ttft_cpu.png

Needs matplotlib (not a project dependency: pip install matplotlib).
"""

from __future__ import annotations

import json
import sys

CASES = ("full", "miss", "host", "disk", "disk_auto")


def main(src: str, dst: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = json.load(open(src))
    lengths = report["lengths"]
    width = 0.8 / len(CASES)
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    for i, case in enumerate(CASES):
        ttft_ms = [1e3 * r["cases"][case]["ttft_s"] for r in lengths]  # one bar per prefix length
        ax.bar([j + (i - 2) * width for j in range(len(lengths))], ttft_ms, width, label=case)
    ax.set_xticks(range(len(lengths)), [f"{r['prefix']} + {r['suffix']}" for r in lengths])
    ax.set_xlabel("prefix + new tokens")
    ax.set_ylabel("TTFT (ms, median)")
    env = report["env"]
    ax.set_title(f"TTFT by tier: {env['device']}, {env['shape']} x{env['layers']} layers, {env['dtype']}")
    ax.legend(ncol=5, fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(dst)


if __name__ == "__main__":
    main(*sys.argv[1:3])
