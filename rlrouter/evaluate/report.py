"""Evaluation outputs: results JSON, a markdown table, and a cost-success frontier PNG."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path

TAXONOMY_LABELS = ("easy", "hard", "intractable")


def budget_order(label: str):
    """Natural order: unbudgeted first, then by cap kind and value (5 before 10)."""
    parts = re.split(r"(\d+(?:\.\d+)?)", label)
    return (label != "none", [float(p) if i % 2 else p for i, p in enumerate(parts)])


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown_table(rows: list[dict]) -> str:
    """One line per (policy, budget), grouped by budget."""
    header = (
        "| budget | policy | success | mean cost ($) | cost vs large | large frac | "
        "easy | hard | intractable | violations | gap recovered | well-formed |"
    )
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for row in sorted(rows, key=lambda r: (budget_order(r["budget"]), r["mean_cost_usd"])):
        tax = row["success_by_taxonomy"]
        lines.append(
            f"| {row['budget']} | {row['policy']} | {row['success']:.3f} | {row['mean_cost_usd']:.4g} | "
            f"{_fmt(row['cost_vs_large'], '.2f')} | {row['large_fraction']:.2f} | "
            + " | ".join(_fmt(tax.get(label), ".2f") for label in TAXONOMY_LABELS)
            + f" | {row['budget_violations']} | {_fmt(row['gap_recovered'], '.2f')} | {_fmt(row.get('well_formed'), '.3f')} |"
        )
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def frontier_plot(rows: list[dict], path: Path, title: str) -> None:
    """Success vs mean cost; one panel per budget, random(p) drawn as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["budget"] for r in rows}, key=budget_order)
    ncols = min(3, len(budgets))
    nrows = math.ceil(len(budgets) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows), squeeze=False, sharey=True)
    flat = axes.ravel()
    for ax in flat[len(budgets):]:
        ax.set_visible(False)
    for ax, budget in zip(flat, budgets):
        group = [r for r in rows if r["budget"] == budget]
        randoms = sorted((r for r in group if r["policy"].startswith("random")), key=lambda r: r["mean_cost_usd"])
        if randoms:
            ax.plot([r["mean_cost_usd"] for r in randoms], [r["success"] for r in randoms], "o--", color="gray",
                    label="random(p)")
        for r in group:
            if r["policy"].startswith("random"):
                continue
            baseline = r["policy"].split("(")[0] in ("always-small", "always-large", "first-large", "escalate")
            marker = "*" if r["policy"] == "oracle" else ("o" if baseline else "D")  # D: a trained router
            ax.plot(r["mean_cost_usd"], r["success"], marker, markersize=12 if marker == "*" else 8, label=r["policy"])
        ax.set_title(f"budget: {budget}")
        ax.set_xlabel("mean cost per task (USD)")
        ax.grid(alpha=0.3)
    for row_axes in axes:
        row_axes[0].set_ylabel("success rate")
    handles, labels = flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower right" if len(budgets) < len(flat) else "upper right")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out_dir: Path, rows: list[dict], records: list[dict], meta: dict) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``frontier.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md", "plot": out_dir / "frontier.png"}
    write_atomic(paths["json"], json.dumps({"meta": meta, "summary": rows, "episodes": records}, indent=1))
    table = markdown_table(rows)
    tax = meta.get("taxonomy_counts")
    preface = f"# Evaluation: {meta.get('recipe', '')}\n\n{meta.get('tasks')} held-out tasks ({meta.get('split')})"
    if tax:
        preface += ", taxonomy " + ", ".join(f"{k} {v}" for k, v in tax.items())
    write_atomic(paths["markdown"], preface + ".\n\n" + table + "\n")
    frontier_plot(rows, paths["plot"], f"{meta.get('recipe', '')}: cost-success frontier")
    return paths
