"""Run learners on a small protocol in several profiles and print the gap table (docs/reproducing.md).

Profiles, per learner, all on the protocol of ``exps/<learner>_<protocol>.json`` (P1 by default):

- ``default``: that config as it is (pilot's behaviour);
- ``pilot``: plus what ``exps/reproduce/pilot/<learner>.json`` changes against PILOT's
  ``exps/<learner>.json`` (PILOT's transforms, batch-wise prompts where PILOT's config has them, ...);
- ``official``: the same from ``exps/reproduce/official/<learner>.json``, where that file exists.

Protocol keys (data, subset, tasks, epochs, backbone, seed, class order) always come from the
protocol config, so every column runs the same stream. ``--ablate`` adds rows that switch one
departure alone on top of ``default`` (names below). Results go to ``--out`` after every run, so
an interrupted sitting keeps what it measured. Usage (here, with the shared assets):

    python tools/reproduce.py --assets ../shared/assets --learners l2p dualprompt --ablate all
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pilot.config import load_raw  # noqa: E402
from pilot.configure import build_config  # noqa: E402
from pilot.engine import run_experiment  # noqa: E402

LEARNERS = ["simplecil", "l2p", "dualprompt", "coda_prompt", "ranpac", "aper_adapter", "aper_ssf", "aper_vpt_deep",
            "aper_vpt_shallow", "aper_finetune", "slca", "cofima", "lae", "fecam", "ease", "mos", "finetune"]
PROFILES = ["default", "pilot", "official"]
PROTOCOL_KEYS = {"prefix", "dataset", "shuffle", "init_cls", "increment", "device", "seed", "backbone_type",
                 "model_name", "tuned_epoch", "epochs", "train_per_class", "test_per_class", "max_tasks",
                 "eval_batch_size", "data_path", "weights_dir", "log_dir"}
# One departure switched alone on top of the default: name -> (learners, overrides).
ABLATIONS = {
    "input normalisation": (["l2p", "dualprompt"], {"preprocess": "pilot"}),
    "batch-wise vote": (["l2p", "dualprompt"], {"batchwise_prompt": True}),
    "no gradient clipping": (["l2p", "dualprompt"], {"clip_grad": 0.0}),
    "prompt position embedding": (["l2p"], {"prompt_position": "cls"}),
    "torch's cosine annealing": (["coda_prompt"], {"scheduler": "cosine_annealing"}),
    "trained new head after merge": (["cofima"], {"new_head": "trained"}),
    "PILOT's FeCAM covariance": (["fecam"], {"pilot_covariance": True}),
    "MOS's in-forward merge": (["mos"], {"adapter_merge": "forward"}),
}


def profile_overrides(learner: str, profile: str) -> dict | None:
    """What a profile changes against PILOT's config of the learner; None where it has no file."""
    if profile == "default":
        return {}
    path = ROOT / "exps" / "reproduce" / profile / f"{learner}.json"
    if not path.is_file():
        return None
    pilots = load_raw(ROOT / "exps" / f"{learner}.json")
    wanted = load_raw(path)
    return {k: v for k, v in wanted.items()
            if k not in PROTOCOL_KEYS and not k.startswith("_") and pilots.get(k) != v}


def measure(learner: str, protocol: str, overrides: dict, assets: str, log_dir: str) -> dict:
    raw = load_raw(ROOT / "exps" / f"{learner}_{protocol}.json")
    local = {"data_path": assets, "weights_dir": assets, "download": False, "log_dir": log_dir, "progress": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the batch-wise and ignored-key warnings: recorded in results.json
        config = build_config(raw, {**overrides, **local})
    started = time.perf_counter()
    (result,) = run_experiment(config)
    last = result["per_task"][-1]
    return {"learner": learner, "overrides": overrides, "curve": result["accuracy_curve"],
            "average": result["average_incremental_accuracy"], "last": result["last_accuracy"],
            "forgetting": result["forgetting"], "seconds": time.perf_counter() - started,
            "task_identification": last.get("task_identification_accuracy"),
            "batch_dependent": result["batch_dependent_evaluation"]}


def cell(row: dict | None) -> str:
    if row is None:
        return "-"
    text = f"{row['average']:.2f} / {row['last']:.2f}"
    if row["task_identification"] is not None:
        text += f" (task id {row['task_identification']:.1f}%)"
    return text


def table(results: dict) -> str:
    lines = ["| learner | " + " | ".join(PROFILES) + " |", "|---" * (len(PROFILES) + 1) + "|"]
    for learner, columns in results["profiles"].items():
        lines.append(f"| {learner} | " + " | ".join(cell(columns.get(p)) for p in PROFILES) + " |")
    if results["ablations"]:
        lines += ["", "| learner | switched alone | Ā / last | Δ Ā vs default |", "|---|---|---|---|"]
        for row in results["ablations"]:
            default = results["profiles"].get(row["learner"], {}).get("default")
            delta = f"{row['average'] - default['average']:+.2f}" if default else "-"
            lines.append(f"| {row['learner']} | {row['name']} | {cell(row)} | {delta} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", required=True, help="folder with CIFAR-100 and the backbone weights")
    parser.add_argument("--learners", nargs="+", default=LEARNERS, choices=LEARNERS)
    parser.add_argument("--profiles", nargs="+", default=PROFILES, choices=PROFILES)
    parser.add_argument("--protocol", default="p1", help="config suffix: exps/<learner>_<protocol>.json")
    parser.add_argument("--ablate", nargs="*", default=[], help=f"'all' or names of: {', '.join(ABLATIONS)}")
    parser.add_argument("--out", default="reproduce.json")
    args = parser.parse_args()
    ablations = list(ABLATIONS) if args.ablate == ["all"] else args.ablate
    unknown = [name for name in ablations if name not in ABLATIONS]
    if unknown:
        parser.error(f"unknown ablation {unknown}; known: {', '.join(ABLATIONS)}")
    results = {"protocol": args.protocol, "profiles": {}, "ablations": []}
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as logs:
        for learner in args.learners:
            for profile in args.profiles:
                overrides = profile_overrides(learner, profile)
                if overrides is None:
                    continue
                row = measure(learner, args.protocol, overrides, args.assets, f"{logs}/{learner}-{profile}")
                results["profiles"].setdefault(learner, {})[profile] = row
                out.write_text(json.dumps(results, indent=2))
                print(f"{learner} {profile} {overrides}: {cell(row)} in {row['seconds']:.0f}s", flush=True)
        for name in ablations:
            learners, overrides = ABLATIONS[name]
            for learner in (l for l in learners if l in args.learners):
                row = {"name": name, **measure(learner, args.protocol, overrides, args.assets,
                                               f"{logs}/{learner}-{name.replace(' ', '_')}")}
                results["ablations"].append(row)
                out.write_text(json.dumps(results, indent=2))
                print(f"{learner} {name}: {cell(row)} in {row['seconds']:.0f}s", flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
