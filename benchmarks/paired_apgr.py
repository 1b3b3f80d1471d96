"""The APGR difference between two policy families of one evaluation, with a paired bootstrap.

Reads an evaluation's ``results.json`` (``rlrouter eval`` or a recipe's eval stage) and,
for each ``FIRST:SECOND`` pair of family names (``sft``, ``bopo``, ``random``, ``mf``, ...),
prints APGR(FIRST) − APGR(SECOND) on the call-share and the dollar axis with its bootstrap
standard error and 95% interval (``rlrouter.evaluate.curves.family_difference``: every
resample scores both families on the same draw of tasks). The issue's bar "above random by
two standard errors" reads ``difference > 2 SE`` on ``ROUTER:random``.

usage: python benchmarks/paired_apgr.py runs/<name>/eval/results.json bopo:random bopo:mf [--budget none]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="an evaluation's results.json")
    parser.add_argument("pairs", nargs="+", help="FIRST:SECOND family names, e.g. bopo:random")
    parser.add_argument("--budget", default="none")
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()

    from rlrouter.evaluate.curves import family_difference
    from rlrouter.evaluate.runner import EpisodeRecord

    pairs = [pair.split(":") for pair in args.pairs]
    bad = [pair for pair, parts in zip(args.pairs, pairs) if len(parts) != 2]
    if bad:
        raise SystemExit(f"pairs must be FIRST:SECOND family names, got {bad}")
    data = json.loads(Path(args.results).read_text())
    records = [EpisodeRecord(**r) for r in data["episodes"]]
    top = data["meta"]["pool"][-1]["name"]  # the pool's tiers, cheapest first
    print(f"{len(records)} episodes over {len({r.task_id for r in records})} tasks; budget {args.budget}; "
          f"{args.resamples} paired resamples; priciest tier {top}")
    print("| difference | APGR | SE | 95% interval | APGR ($) | SE | 95% interval |")
    print("|---|---|---|---|---|---|---|")
    for first, second in pairs:
        d = family_difference(records, first, second, top, budget=args.budget, resamples=args.resamples)
        cells = [f"{d[k]['difference']:+.3f} | {d[k]['se']:.3f} | [{d[k]['ci'][0]:+.3f}, {d[k]['ci'][1]:+.3f}]"
                 for k in ("apgr", "apgr_usd")]
        print(f"| {first} − {second} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
