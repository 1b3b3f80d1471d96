"""Boundary report: taxonomy counts, a per-class table, and a scatter of s_S vs s_L (PNG)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rlrouter.boundary.runs import LABELS, BoundaryStats, taxonomy_counts


def boundary_table(stats: dict[str, BoundaryStats], labels: dict[str, str]) -> str:
    lines = ["| class | tasks | share | always-small success | always-large success | cost small ($) | cost large ($) |",
             "|---|---|---|---|---|---|---|"]
    n = len(stats)
    for label in LABELS + ("all",):
        group = [s for t, s in stats.items() if label == "all" or labels[t] == label]
        if not group:
            continue
        lines.append(
            f"| {label} | {len(group)} | {len(group) / n:.1%} | {np.mean([s.s_small for s in group]):.3f} | "
            f"{np.mean([s.s_large for s in group]):.3f} | {np.mean([s.c_small for s in group]):.4g} | "
            f"{np.mean([s.c_large for s in group]):.4g} |")
    return "\n".join(lines)


def write_boundary_report(out_dir: Path, stats: dict[str, BoundaryStats], labels: dict[str, str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    (out_dir / "boundary.md").write_text(f"# {title}\n\n{boundary_table(stats, labels)}\n")
    (out_dir / "taxonomy.json").write_text(json.dumps(taxonomy_counts(labels), indent=1))
    rng = np.random.default_rng(0)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for label, color in zip(LABELS, ("tab:green", "tab:orange", "tab:red")):
        group = [s for t, s in stats.items() if labels[t] == label]
        jitter = rng.uniform(-0.02, 0.02, size=(2, len(group)))
        ax.scatter([s.s_small for s in group] + jitter[0], [s.s_large for s in group] + jitter[1], s=12, alpha=0.6,
                   color=color, label=f"{label} ({len(group)})")
    ax.set_xlabel("always-small success rate")
    ax.set_ylabel("always-large success rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "boundary.png", dpi=110)
    plt.close(fig)
