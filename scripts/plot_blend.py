#!/usr/bin/env python
"""Plot `bench_blend.py`'s quality figures as an SVG bar chart (no plotting library needed).

    .venv/bin/python scripts/plot_blend.py blend.json docs/img/blend_quality.svg

One row per configuration (selection @ recompute ratio): mean KL(full || blend) as a
bar on a log scale, with top-1 agreement and greedy exact match written beside it.
"""

from __future__ import annotations

import json
import math
import sys
from html import escape

ROW_H, LEFT, BAR_W, RIGHT = 26, 150, 420, 260
KL_FLOOR = 1e-6  # ratio 1.0 gives ~1e-8: drawn at the floor


def rows_of(report: dict) -> list[tuple[str, dict]]:
    quality = report.get("quality", report)
    return [(name, q) for name, q in quality.items() if isinstance(q, dict) and "mean_kl" in q]


def svg(rows: list[tuple[str, dict]], title: str) -> str:
    kls = [max(q["mean_kl"], KL_FLOOR) for _, q in rows]
    lo, hi = math.log10(KL_FLOOR), math.log10(max(kls)) + 0.1
    width, height = LEFT + BAR_W + RIGHT, 60 + ROW_H * len(rows) + 30

    def x(kl: float) -> float:
        return LEFT + BAR_W * (math.log10(max(kl, KL_FLOOR)) - lo) / (hi - lo)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>']
    for i, (name, q) in enumerate(rows):
        y = 40 + i * ROW_H
        color = "#c0392b" if "off_by_one" in name else "#7f8c8d" if name.startswith("random") else "#2e86c1"
        out.append(f'<text x="{LEFT - 8}" y="{y + 16}" text-anchor="end">{escape(name)}</text>')
        out.append(f'<rect x="{LEFT}" y="{y + 4}" width="{x(q["mean_kl"]) - LEFT:.1f}" height="{ROW_H - 8}" '
                   f'fill="{color}"/>')
        out.append(f'<text x="{LEFT + BAR_W + 8}" y="{y + 16}">KL {q["mean_kl"]:.2g} · top-1 '
                   f'{q["top1_agreement"]:.3f} · exact {q["greedy_exact_match"]:.2f}</text>')
    axis_y = 40 + ROW_H * len(rows) + 4
    for p in range(int(math.floor(lo)), int(math.ceil(hi)) + 1):
        if lo <= p <= hi:
            out.append(f'<line x1="{x(10 ** p):.1f}" y1="36" x2="{x(10 ** p):.1f}" y2="{axis_y}" stroke="#ddd"/>')
            out.append(f'<text x="{x(10 ** p):.1f}" y="{axis_y + 14}" text-anchor="middle">1e{p}</text>')
    out.append("</svg>")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    report = json.loads(open(argv[0]).read())
    rows = rows_of(report)
    if not rows:
        print(f"{argv[0]}: no quality figures", file=sys.stderr)
        return 1
    n = rows[0][1].get("prompts", "?")
    with open(argv[1], "w") as f:
        f.write(svg(rows, f"Blended reuse on SmolLM2-135M: mean KL vs full prefill ({n} prompts, log scale)"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
