"""Do the transferability estimators rank backbones as continual learning does? (docs/backbones.md, "Choosing
the backbone").

For each candidate: ``pilot select``'s scores on the first task's training images (one sitting, a
cold feature cache), then SimpleCIL's and RanPAC's P0 runs with that backbone (their own cache, so
each SimpleCIL run is a whole P0 run; RanPAC reuses its features). Prints a Markdown table of scores
and accuracies, Kendall's tau of each estimator's ranking against each learner's ranking by Ā and by
last accuracy, and the selection's time against one P0 run; ``--pair A,B`` adds SimpleCIL P0 on the
two backbones together. Writes everything to ``--out``. Usage (here, with the shared assets):

    python tools/selection_study.py --assets ../shared/assets --pair deit_tiny_patch16_224,deit_tiny_patch16_224@6
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pilot.config import load_raw  # noqa: E402
from pilot.configure import build_config  # noqa: E402
from pilot.engine import run_experiment  # noqa: E402
from pilot.selection import HEADINGS, SCORES, select, table  # noqa: E402
from pilot.transferability import kendall_tau  # noqa: E402

CANDIDATES = ["deit_tiny_patch16_224", "deit_tiny_patch16_224@9", "deit_tiny_patch16_224@6", "deit_tiny_patch16_224@3",
              "random:deit_tiny_patch16_224", "random:open_clip:ViT-S-32"]
LEARNERS = ("simplecil", "ranpac")


def p0_run(learner: str, backbone, sets: dict) -> tuple[dict, float]:
    started = time.perf_counter()
    (result,) = run_experiment(build_config(load_raw(ROOT / "exps" / f"{learner}_p0.json"),
                                            {**sets, "backbone_type": backbone}))
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", required=True, help="folder with DeiT-Tiny weights and CIFAR-100")
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--pair", help="two candidates for a two-backbone SimpleCIL run, comma-separated")
    parser.add_argument("--out", default="selection_study.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="selection_study_"))
    sets = {"data_path": args.assets, "weights_dir": args.assets, "log_dir": str(work / "logs"), "progress": False}
    candidates = args.candidates.split(",")

    config = build_config(load_raw(ROOT / "exps" / "simplecil_p0.json"), {**sets, "feature_cache_dir": str(work / "cold")})
    selection = select(config, candidates)
    study = {"selection": selection, "runs": {}}
    runs_cache = {**sets, "feature_cache_dir": str(work / "runs")}
    for backbone in candidates:
        study["runs"][backbone] = {}
        for learner in LEARNERS:
            result, seconds = p0_run(learner, backbone, runs_cache)
            study["runs"][backbone][learner] = {"average": result["average_incremental_accuracy"],
                                                "last": result["last_accuracy"], "seconds": seconds,
                                                "curve": result["accuracy_curve"],
                                                "encoded_images": result["timings"]["encoded_images"]}
            print(f"{backbone} {learner}: Ā {result['average_incremental_accuracy']:.2f}, last "
                  f"{result['last_accuracy']:.2f}, {seconds:.0f}s", flush=True)
    if args.pair:
        pair = args.pair.split(",")
        result, seconds = p0_run("simplecil", pair, {**sets, "feature_cache_dir": str(work / "pair")})
        study["pair"] = {"backbones": pair, "curve": result["accuracy_curve"], "seconds": seconds,
                         "average": result["average_incremental_accuracy"], "last": result["last_accuracy"],
                         "encoded_images": result["timings"]["encoded_images"]}
    Path(args.out).write_text(json.dumps(study, indent=2) + "\n")
    print(report(study))


def report(study: dict) -> str:
    selection, runs = study["selection"], study["runs"]
    rows = {row["backbone"]: row for row in selection["candidates"]}
    names = list(runs)
    lines = [table(selection), "",
             "| backbone | " + " | ".join(f"{learner} Ā / last" for learner in LEARNERS) + " |",
             "|---" * (len(LEARNERS) + 1) + "|"]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{runs[name][l]['average']:.2f} / {runs[name][l]['last']:.2f}"
                                                 for l in LEARNERS) + " |")
    lines += ["", "| estimator | " + " | ".join(f"τ vs {l} {m}" for l in LEARNERS for m in ("Ā", "last")) + " |",
              "|---" * (2 * len(LEARNERS) + 1) + "|"]
    for score in SCORES:
        scored = [name for name in names if rows[name]["scores"][score] is not None]
        taus = [kendall_tau([rows[n]["scores"][score] for n in scored], [runs[n][l][m] for n in scored])
                for l in LEARNERS for m in ("average", "last")]
        lines.append(f"| {HEADINGS[score]} ({len(scored)} backbones) | " + " | ".join(f"{t:.2f}" for t in taus) + " |")
    p0 = [runs[name]["simplecil"]["seconds"] for name in names]
    lines += ["", f"selection of {len(names)} candidates: {selection['seconds']:.1f}s; one SimpleCIL P0 run: "
                  f"{min(p0):.0f}-{max(p0):.0f}s ({runs[names[0]]['simplecil']['seconds']:.0f}s with {names[0]})"]
    if "pair" in study:
        pair = study["pair"]
        lines.append(f"SimpleCIL P0 on {' + '.join(pair['backbones'])}: Ā {pair['average']:.2f}, last {pair['last']:.2f}, "
                     f"{pair['encoded_images']} images encoded, curve {', '.join(f'{a:.1f}' for a in pair['curve'])}")
        for name in pair["backbones"]:
            curve = runs[name]["simplecil"]["curve"]
            lines.append(f"  {name} alone: curve {', '.join(f'{a:.1f}' for a in curve)}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
