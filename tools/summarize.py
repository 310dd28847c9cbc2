"""Compare runs: ``python tools/summarize.py <run dirs or folders of runs...>``.

Prints a Markdown table, one row per run (learner, prefix, seed, accuracy curve, Ā, last,
forgetting, train and eval seconds, peak host memory), then one row per learner and prefix with
the mean ± standard deviation of Ā and last accuracy over its seeds.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import numpy as np

from plot import load_runs


def run_row(results: dict) -> str:
    config, timings = results["config"], results["timings"]
    curve = ", ".join(f"{a:.1f}" for a in results["accuracy_curve"])
    forgetting = results["forgetting"]
    return (f"| {config['model_name']} | {config.get('prefix', '').strip()} | {results['seed']} | {curve} | "
            f"{results['average_incremental_accuracy']:.2f} | {results['last_accuracy']:.2f} | "
            f"{'-' if forgetting is None else f'{forgetting:.2f}'} | {timings['train_seconds']:.0f} | "
            f"{timings['eval_seconds']:.0f} | {results['peak_memory']['host_rss_mb']:.0f} |")


def seed_rows(runs: list[dict]) -> list[str]:
    groups = defaultdict(list)
    for results in runs:
        groups[(results["config"]["model_name"], results["config"].get("prefix", "").strip())].append(results)
    rows = []
    for (learner, prefix), members in sorted(groups.items()):
        average = [r["average_incremental_accuracy"] for r in members]
        last = [r["last_accuracy"] for r in members]
        rows.append(f"| {learner} | {prefix} | {len(members)} | {np.mean(average):.2f} ± {np.std(average):.2f} | "
                    f"{np.mean(last):.2f} ± {np.std(last):.2f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    args = parser.parse_args(argv)
    _, runs = load_runs(args.runs)
    if not runs:
        print(f"summarize: no results.json under {', '.join(args.runs)}", file=sys.stderr)
        return 2
    print("| learner | prefix | seed | accuracy after each task (%) | Ā | last | forgetting | train s | eval s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(run_row(r) for r in runs))
    print("\n| learner | prefix | seeds | Ā (mean ± std) | last (mean ± std) |")
    print("|---|---|---|---|---|")
    print("\n".join(seed_rows(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
