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
    """One line per (policy, budget), grouped by budget; with more than two tiers a column
    gives every tier's share of calls (cheapest first)."""
    tiers = list(rows[0].get("tier_shares", {})) if rows else []
    shares = len(tiers) > 2
    header = (
        "| budget | policy | success | mean cost ($) | cost vs large | large frac | "
        + (f"calls {' / '.join(tiers)} | " if shares else "")
        + "easy | hard | intractable | violations | gap recovered | well-formed |"
    )
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for row in sorted(rows, key=lambda r: (budget_order(r["budget"]), r["mean_cost_usd"])):
        tax = row["success_by_taxonomy"]
        split = (" / ".join(f"{row['tier_shares'].get(t, 0.0):.2f}" for t in tiers) + " | ") if shares else ""
        lines.append(
            f"| {row['budget']} | {row['policy']} | {row['success']:.3f} | {row['mean_cost_usd']:.4g} | "
            f"{_fmt(row['cost_vs_large'], '.2f')} | {row['large_fraction']:.2f} | " + split
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


BOUNDARY_POLICIES = ("always-small", "always-large")


def _panels(budgets: list[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(3, len(budgets))
    nrows = math.ceil(len(budgets) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.8 * ncols, 3.9 * nrows), squeeze=False, sharey=True)
    for ax in axes.ravel()[len(budgets):]:
        ax.set_visible(False)
    return plt, fig, axes


def _families(group: list[dict]) -> dict[str, list[dict]]:
    """Rows by knob family (``random(p=0.5)`` -> ``random``), boundaries left out."""
    families: dict[str, list[dict]] = {}
    for r in group:
        if r["policy"] not in BOUNDARY_POLICIES:
            families.setdefault(r["policy"].split("(")[0], []).append(r)
    return families


def frontier_plot(rows: list[dict], path: Path, title: str) -> None:
    """Success vs mean cost, one panel per budget: each family a line through its knob's
    points (random p, embedding thresholds, route biases), the oracle and the boundaries points."""
    budgets = sorted({r["budget"] for r in rows}, key=budget_order)
    plt, fig, axes = _panels(budgets)
    flat = axes.ravel()
    colors = {}
    for ax, budget in zip(flat, budgets):
        group = [r for r in rows if r["budget"] == budget]
        for r in group:
            if r["policy"] in BOUNDARY_POLICIES:
                ax.plot(r["mean_cost_usd"], r["success"], "s", color="black" if r["policy"] == "always-large" else "gray",
                        markersize=7, label=r["policy"])
        for name, members in sorted(_families(group).items()):
            members = sorted(members, key=lambda r: r["mean_cost_usd"])
            color = colors.setdefault(name, f"C{len(colors) % 10}")
            style = "*" if name == "oracle" else ("o-" if len(members) > 1 else "D")
            ax.plot([r["mean_cost_usd"] for r in members], [r["success"] for r in members], style, color=color,
                    markersize=13 if name == "oracle" else 6, label=name)
        ax.set_title(f"budget: {budget}")
        ax.set_xlabel("mean cost per task (USD)")
        ax.grid(alpha=0.3)
    for row_axes in axes:
        row_axes[0].set_ylabel("success rate")
    _legend(fig, flat, len(budgets))
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pgr_plot(curves: list[dict], path: Path, title: str) -> None:
    """RouteLLM's view: PGR against the share of calls to the priciest tier, one line per
    family (through the boundaries), one panel per budget."""
    budgets = sorted({c["budget"] for c in curves}, key=budget_order)
    if not budgets:
        return
    plt, fig, axes = _panels(budgets)
    flat = axes.ravel()
    colors = {}
    for ax, budget in zip(flat, budgets):
        for curve in sorted((c for c in curves if c["budget"] == budget), key=lambda c: c["family"]):
            points = sorted(curve["points"], key=lambda p: (p["share"], p["pgr"]))
            color = colors.setdefault(curve["family"], f"C{len(colors) % 10}")
            label = f"{curve['family']} ({_fmt(curve['apgr'], '.3f')})"
            ax.plot([p["share"] for p in points], [p["pgr"] for p in points], ".-", color=color, label=label)
        ax.axhline(0.0, color="gray", lw=0.8)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_title(f"budget: {budget}")
        ax.set_xlabel("share of calls to the priciest tier")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="family (APGR)", title_fontsize=7)
    for row_axes in axes:
        row_axes[0].set_ylabel("performance gap recovered")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _legend(fig, flat, used: int) -> None:
    handles, labels = {}, []
    for ax in flat[:used]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = handle
                labels.append(label)
    fig.legend([handles[l] for l in labels], labels, fontsize=8, loc="lower right" if used < len(flat) else "upper right")


def _with_ci(value, ci, spec: str) -> str:
    if value is None:
        return "–"
    text = format(value, spec)
    return text if not ci else f"{text} [{format(ci[0], spec)}, {format(ci[1], spec)}]"


def curves_table(curves: list[dict]) -> str:
    """APGR (call share and dollar axes) and CPT(50%/80%) per (budget, family), 95% intervals."""
    header = "| budget | family | points | APGR | APGR ($) | CPT(50%) | CPT(80%) |"
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for c in sorted(curves, key=lambda c: (budget_order(c["budget"]), -(c["apgr"] if c["apgr"] is not None else -9))):
        lines.append(
            f"| {c['budget']} | {c['family']} | {len(c['policies'])} | {_with_ci(c['apgr'], c['apgr_ci'], '.3f')} | "
            f"{_with_ci(c['apgr_usd'], c['apgr_usd_ci'], '.3f')} | {_with_ci(c['cpt50'], c['cpt50_ci'], '.1%')} | "
            f"{_with_ci(c['cpt80'], c['cpt80_ci'], '.1%')} |")
    return "\n".join(lines)


def write_report(out_dir: Path, rows: list[dict], records: list[dict], meta: dict,
                 curves: list[dict] | None = None) -> dict[str, Path]:
    """Write ``results.json``, ``results.md``, ``frontier.png`` and (with curves) ``pgr.png``."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md", "plot": out_dir / "frontier.png"}
    curves = curves or []
    write_atomic(paths["json"], json.dumps({"meta": meta, "summary": rows, "curves": curves, "episodes": records},
                                           indent=1))
    table = markdown_table(rows)
    tax = meta.get("taxonomy_counts")
    preface = f"# Evaluation: {meta.get('recipe', '')}\n\n{meta.get('tasks')} held-out tasks ({meta.get('split')})"
    if tax:
        preface += ", taxonomy " + ", ".join(f"{k} {v}" for k, v in tax.items())
    text = preface + ".\n\n" + table + "\n"
    if curves:
        text += ("\n## Knob families: APGR and CPT\n\nPGR against the share of calls to the priciest tier, through "
                 "each family's points and the budget's two boundary policies (`rlrouter/evaluate/curves.py`); "
                 f"95% bootstrap intervals over tasks ({meta.get('bootstrap')} resamples).\n\n"
                 + curves_table(curves) + "\n")
        paths["pgr_plot"] = out_dir / "pgr.png"
    write_atomic(paths["markdown"], text)
    frontier_plot(rows, paths["plot"], f"{meta.get('recipe', '')}: cost-success frontier")
    if curves:
        pgr_plot(curves, paths["pgr_plot"], f"{meta.get('recipe', '')}: gap recovered vs priciest-tier share")
    return paths
