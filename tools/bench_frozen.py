"""Benchmark: a frozen-feature learner's whole run against bare backbone passes over the same images.

Reference protocol P0 (docs/benchmarks.md): cifar224, B0 Inc10, seed 1993, DeiT-Tiny, first 20 training and
first 10 test images per class. Learners: ``simplecil``, ``ranpac`` (no adaptation, M = 10000),
``aper_adapter`` (adapters trained 1 epoch on the first task; its two branches, pretrained and
adapted, each encode every image once, so its bare cost is two passes per image, and the
adaptation's training time, logged by the learner, is reported apart), ``fecam`` (the same
adaptation, one branch), and ``ease`` (an adapter trained 1 epoch per task; each image is encoded
once per subspace that needs it, so its bare cost is one pass per encoding the run reports, and
its adapters' training, logged per task, is reported apart). ``--tasks`` stops the stream early.
Both measurements run in this one process, back to back:

- bare: every image of the protocol (3,000) loaded, eval-transformed and passed through the
  backbone once, in the run's batch size, no grad: the least any frozen-feature method must do;
- whole run: ``run_experiment`` from the config to results.json (data loading, backbone
  creation, ten tasks, evaluation after each, logs, checkpoints), and for RanPAC its ridge
  solves, which are not encoder passes (their time is reported apart).

Rounds alternate the two so that drifts in machine speed hit both; the ratio is of the totals.
Target: whole / bare <= 1.15. Usage (here, with the shared assets):

    python tools/bench_frozen.py --assets ../shared/assets [--learner ranpac]
"""
from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import torch

from pilot.configure import build_config
from pilot.data import TaskStream, eval_transform, load_dataset
from pilot.data.loader import make_loader
from pilot.backbones import create_backbone
from pilot.engine import run_experiment


LEARNER_KEYS = {"simplecil": {}, "ranpac": {"tuned_epoch": 0, "M": 10000}, "aper_adapter": {"tuned_epoch": 1},
                "fecam": {"tuned_epoch": 1}, "ease": {"init_epochs": 1}}
BRANCHES = {"aper_adapter": 2}  # encoder passes per image the learner needs
PER_ENCODING = {"ease"}  # learners whose passes per image vary: the bare cost is one pass per encoding


def protocol_config(assets: Path, log_dir: str, learner: str = "simplecil", tasks: int = 0) -> dict:
    return {"max_tasks": tasks,
        **LEARNER_KEYS[learner], "model_name": learner, "dataset": "cifar224", "data_path": str(assets), "download": False,
        "backbone_type": "deit_tiny_patch16_224", "weights_dir": str(assets), "device": ["cpu"],
        "init_cls": 10, "increment": 10, "seed": [1993], "shuffle": True,
        "train_per_class": 20, "test_per_class": 10, "eval_batch_size": 64, "log_dir": log_dir,
        "progress": False, "prefix": "bench",
    }


def bare_passes(raw: dict) -> tuple[float, int]:
    """Seconds to load, transform and encode every protocol image once (data already in memory)."""
    config = build_config(raw).experiment
    dataset = load_dataset(config)
    stream = TaskStream(dataset, config.init_cls, config.increment, config.shuffle, config.seed[0],
                        config.train_per_class, config.test_per_class, config.max_tasks)
    backbone = create_backbone(config.backbone_type, weights_dir=config.weights_dir).eval()
    transform = eval_transform(backbone.data_config, dataset.resize_to_model)
    splits = [s for task in stream.tasks for s in (task.train, task.test)]
    images = 0
    started = time.perf_counter()
    with torch.no_grad():
        for split in splits:
            for batch, _, _ in make_loader(split, transform, config.eval_batch_size):
                backbone(batch)
                images += len(batch)
    return time.perf_counter() - started, images


def whole_run(raw: dict) -> tuple[float, dict, float]:
    """Seconds of the whole run, its results, and the seconds of work that is not encoding, as the
    learner logs it (RanPAC's ridge selection, accumulation and solve; APER's adapter training)."""
    started = time.perf_counter()
    (result,) = run_experiment(build_config(raw))
    seconds = time.perf_counter() - started
    log = (Path(result["run_dir"]) / "run.log").read_text()
    other = re.findall(r"(?:selection|accumulation|solve|adapted on the first task in|trained its adapter in) "
                       r"([0-9.]+)s", log)
    return seconds, result, sum(map(float, other))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default="../shared/assets", help="folder with CIFAR-100 and DeiT-Tiny weights")
    parser.add_argument("--learner", choices=sorted(LEARNER_KEYS), default="simplecil")
    parser.add_argument("--rounds", type=int, default=3, help="alternate bare / whole run this many times")
    parser.add_argument("--tasks", type=int, default=0, help="learn only the first this many tasks (0: all 10)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    torch.manual_seed(0)
    bare_times, run_times, other_times = [], [], []
    for round_index in range(args.rounds):
        with tempfile.TemporaryDirectory() as log_dir:
            raw = protocol_config(Path(args.assets), log_dir, args.learner, args.tasks)
            bare_seconds, images = bare_passes(raw)
            run_seconds, result, other_seconds = whole_run(raw)
            passes = result["timings"]["encoded_images"] / images if args.learner in PER_ENCODING else 1
            bare_seconds *= BRANCHES.get(args.learner, passes)
        bare_times.append(bare_seconds)
        run_times.append(run_seconds)
        other_times.append(other_seconds)
        print(f"round {round_index + 1}: bare {bare_seconds:.1f}s, whole run {run_seconds:.1f}s, ratio {run_seconds / bare_seconds:.3f}")
    bare_seconds, run_seconds, other_seconds = sum(bare_times), sum(run_times), sum(other_times)
    figures = {
        "learner": args.learner,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "images": images,
        "encoded_by_run": result["timings"]["encoded_images"],
        "bare_seconds": round(bare_seconds, 2),
        "run_seconds": round(run_seconds, 2),
        "ratio_run_over_bare": round(run_seconds / bare_seconds, 3),
        "not_encoding_seconds": round(other_seconds, 2),
        "ratio_run_without_those_over_bare": round((run_seconds - other_seconds) / bare_seconds, 3),
        "average_incremental_accuracy": round(result["average_incremental_accuracy"], 2),
        "last_accuracy": round(result["last_accuracy"], 2),
        "accuracy_curve": [round(a, 2) for a in result["accuracy_curve"]],
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    verdict = "meets" if figures["ratio_run_over_bare"] <= 1.15 else "MISSES"
    print(f"whole run / bare passes = {figures['ratio_run_over_bare']:.3f} ({verdict} the 1.15 target); "
          f"images encoded by the run: {figures['encoded_by_run']} of {images}")


if __name__ == "__main__":
    main()
