"""The CLIP table: zs_clip and proof (and every other CLIP learner registered, e.g. zscl) on CIFAR-100
B0 Inc10 with real ViT-B/16 CLIP weights, each from its ``exps/<name>.json``, one command.

    python tools/clip_table.py --data ~/data                                    # laion400m_e32 (PROOF's tag), via the hub
    python tools/clip_table.py --data ~/data --tag openai                       # OpenAI's weights
    python tools/clip_table.py --data ~/data --checkpoint ~/ViT-B-16.safetensors  # a local open_clip checkpoint

Before any run it loads the weights once and, where they are missing (no hub and no local file), says so
and how to supply them, exit status 2. Then it runs each learner (its results.json under ``--log-dir``)
and prints a Markdown table beside the official PROOF log's numbers (zhoudw-zdw/PROOF@0bb2052,
``logs/proof/cifar224/0/10/cifarb0.log``, laion400m_e32). OpenAI and LAION weights give different numbers:
compare a row with a reference of the same tag.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pilot.backbones import WEIGHTS_DIR_ENV, create_backbone  # noqa: E402
from pilot.config import load_raw, parse_overrides  # noqa: E402
from pilot.configure import build_config  # noqa: E402
from pilot.errors import PilotError  # noqa: E402
from pilot.learners import learner_names  # noqa: E402

MODEL = "ViT-B-16"  # the papers' CLIP; --model names another (or an open_clip model config file)
# The learners of the table, in its order; others follow where a learner of that name is registered.
LEARNERS = ("zs_clip", "proof", "zscl")
# (average incremental, last) accuracy in the official code's own log, by learner and weights tag.
OFFICIAL = {("proof", "laion400m_e32"): (86.77, 79.11)}


def backbone_type(model: str, tag: str) -> str:
    return f"open_clip:{model}:{tag}"


def check_weights(model: str, tag: str, checkpoint: str | None, weights_dir: str) -> str | None:
    """None when the weights load; else one message saying what is missing and how to supply it."""
    spec = backbone_type(model, tag)
    try:
        backbone = create_backbone(spec, pretrained=True, pretrained_path=checkpoint, weights_dir=weights_dir)
    except PilotError as err:
        return (f"clip_table: no CLIP weights for '{spec}', so nothing was run. {err} Here: pass --checkpoint "
                f"<open_clip checkpoint of {model}>, or put '{model}_{tag}.safetensors' in --weights-dir, or run "
                f"where the hub is reachable (the first run downloads them).")
    if backbone.text is None:
        return f"The weights for '{spec}' have no text tower ({backbone.text_missing}): give the whole CLIP checkpoint."
    return None


def run_row(name: str, args) -> dict:
    from pilot.engine import run_experiment

    raw = load_raw(ROOT / "exps" / f"{name}.json")
    raw.update({"backbone_type": backbone_type(args.model, args.tag), "data_path": args.data,
                "weights_dir": args.weights_dir, "log_dir": args.log_dir, "progress": False})
    if args.checkpoint:
        raw["pretrained_path"] = args.checkpoint
    (results,) = run_experiment(build_config(raw, parse_overrides(args.set)))
    return results


def table(rows: list[tuple[str, dict]], model: str, tag: str) -> str:
    lines = ["| learner | weights | avg. incremental acc. | last acc. | official log (avg. / last) |",
             "|---|---|---|---|---|"]
    for name, results in rows:
        official = OFFICIAL.get((name, tag)) if model == MODEL else None
        reference = f"{official[0]:.2f} / {official[1]:.2f}" if official else "-"
        lines.append(f"| {name} | {backbone_type(model, tag)} | {results['average_incremental_accuracy']:.2f} | "
                     f"{results['last_accuracy']:.2f} | {reference} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("PILOT_DATA_DIR", "./data"),
                        help="folder holding CIFAR-100 (cifar-100-python[.tar.gz]); default $PILOT_DATA_DIR")
    parser.add_argument("--tag", default="laion400m_e32", help="open_clip pretrained tag of ViT-B-16 (PROOF's: "
                                                               "laion400m_e32; RAPF's and MoE-Adapters': openai)")
    parser.add_argument("--model", default=MODEL, help="open_clip model (default %(default)s, the papers')")
    parser.add_argument("--checkpoint", help="a local open_clip checkpoint file of ViT-B-16 (image and text towers)")
    parser.add_argument("--weights-dir", default=os.environ.get(WEIGHTS_DIR_ENV, "./weights"),
                        help=f"folder looked in for {MODEL}_<tag>.safetensors (default ${WEIGHTS_DIR_ENV})")
    parser.add_argument("--log-dir", default="logs/clip_table")
    parser.add_argument("--learners", nargs="+", help=f"default: those of {', '.join(LEARNERS)} that exist")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key of every run (as main.py's --set), e.g. train_per_class=50")
    args = parser.parse_args(argv)
    known = learner_names()
    learners = args.learners or [name for name in LEARNERS if name in known]
    missing = check_weights(args.model, args.tag, args.checkpoint, args.weights_dir)
    if missing:
        print(missing, file=sys.stderr)
        return 2
    rows = [(name, run_row(name, args)) for name in learners]
    print(table(rows, args.model, args.tag))
    return 0


if __name__ == "__main__":
    sys.exit(main())
