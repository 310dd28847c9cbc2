"""GPU check: every learner for one P1 task in fp32 and in bf16 autocast, on CUDA, from the assets only.

For each learner: both precisions must finish, and their first-task accuracies must agree within
2 points; it prints the images/s of the training step and of evaluation (from the run's own
timings) against bare backbone passes over the same images (forward for evaluation, forward and
backward for training). Stops starting new runs after ``--budget`` seconds (default 420, so the
whole check stays within 8 minutes). Exit status 0 only when every learner that ran passed.

    python tools/gpu_check.py --assets ../shared/assets            # on a CUDA machine
    python tools/gpu_check.py --assets ../shared/assets --cpu --learners simplecil   # logic smoke test
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pilot.backbones import create_backbone  # noqa: E402
from pilot.config import load_raw  # noqa: E402
from pilot.configure import build_config  # noqa: E402
from pilot.data import TaskStream, load_dataset  # noqa: E402
from pilot.data.loader import make_loader  # noqa: E402
from pilot.data.transforms import Preprocessing  # noqa: E402
from pilot.engine import run_experiment  # noqa: E402

LEARNERS = ["simplecil", "linear_probe", "l2p", "dualprompt", "coda_prompt", "ranpac", "aper_adapter", "slca",
            "cofima", "lae"]
AGREEMENT = 2.0  # accuracy points between fp32 and bf16


def p1_raw(learner: str) -> dict:
    path = ROOT / "exps" / f"{learner}_p1.json"
    raw = load_raw(path if path.is_file() else ROOT / "exps" / "simplecil_p1.json")
    raw["model_name"] = learner
    return raw


def run_once(learner: str, device: str, bf16: bool, assets: str, workers: int, log_dir: str) -> dict:
    overrides = {"max_tasks": 1, "device": [device], "mixed_precision": bf16, "data_path": assets,
                 "weights_dir": assets, "download": False, "log_dir": log_dir, "progress": False,
                 "num_workers": workers, "prefix": "bf16" if bf16 else "fp32"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = build_config(p1_raw(learner), overrides)
    (result,) = run_experiment(config)
    row = result["per_task"][0]
    epochs = getattr(config.learner, "tuned_epoch", 0)
    return {"accuracy": result["accuracy_curve"][0], "train_seconds": row["train_seconds"],
            "eval_seconds": row["eval_seconds"], "epochs": epochs,
            "peak_mb": result["peak_memory"].get("cuda_allocated_mb", 0.0)}


def bare_rates(device: torch.device, assets: str, workers: int, bf16: bool) -> tuple[float, float, int, int]:
    """Images/s of bare DeiT-Tiny passes on P1's first task: forward over its test images, forward and
    backward over its training images (eval transform, batch 64 and 16)."""
    config = build_config(p1_raw("simplecil"), {"data_path": assets, "weights_dir": assets, "download": False})
    exp = config.experiment
    dataset = load_dataset(exp)
    task = TaskStream(dataset, exp.init_cls, exp.increment, exp.shuffle, 1993, exp.train_per_class,
                      exp.test_per_class, 1).tasks[0]
    backbone = create_backbone(exp.backbone_type, True, None, assets).to(device)
    transform = Preprocessing("backbone", backbone.data_config, dataset.resize_to_model).eval()

    def precision():
        return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device.type == "cuda" else contextlib.nullcontext()

    def timed(split, batch, train):
        loader = make_loader(split, transform, batch, num_workers=workers, generator=torch.Generator())
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for images, _, _ in loader:
            images = images.to(device)
            if train:
                with precision():
                    loss = backbone(images).float().square().mean()
                loss.backward()
            else:
                with torch.no_grad(), precision():
                    backbone(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return len(split) / (time.perf_counter() - started)

    timed(task.test, 64, False)  # warm-up: kernels, allocator, file cache
    return timed(task.test, 64, False), timed(task.train, 16, True), len(task.train), len(task.test)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", required=True)
    parser.add_argument("--learners", nargs="+", default=LEARNERS, choices=LEARNERS)
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which no new learner starts")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (bf16 is then off: a logic check only)")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine (or pass --cpu for a logic check).")
        return 2
    device = "cpu" if args.cpu else "0"
    started = time.perf_counter()
    torch_device = torch.device("cpu" if args.cpu else "cuda:0")
    print(f"gpu_check: {torch.cuda.get_device_name(0) if not args.cpu else 'CPU'}, torch {torch.__version__}")
    forward, train, n_train, n_test = bare_rates(torch_device, args.assets, args.workers, bf16=False)
    forward16, train16, _, _ = bare_rates(torch_device, args.assets, args.workers, bf16=True)
    print(f"bare DeiT-Tiny passes, P1 task 1: forward {forward:.0f} img/s (bf16 {forward16:.0f}), "
          f"forward+backward {train:.0f} img/s (bf16 {train16:.0f})")
    print("| learner | fp32 acc | bf16 acc | agree | train img/s fp32 / bf16 (vs bare fwd+bwd) | "
          "eval img/s fp32 / bf16 (vs bare fwd) | peak MiB |")
    failures, skipped = [], []
    with tempfile.TemporaryDirectory() as logs:
        for learner in args.learners:
            if time.perf_counter() - started > args.budget:
                skipped.append(learner)
                continue
            try:
                fp32 = run_once(learner, device, False, args.assets, args.workers, f"{logs}/{learner}")
                bf16 = run_once(learner, device, True, args.assets, args.workers, f"{logs}/{learner}")
            except Exception:  # report and go on: one broken learner must not hide the others
                failures.append(learner)
                print(f"| {learner} | failed: {traceback.format_exc(limit=3).splitlines()[-1]} |")
                continue
            agree = abs(fp32["accuracy"] - bf16["accuracy"]) <= AGREEMENT
            if not agree:
                failures.append(learner)

            def train_rate(run):
                return run["epochs"] * n_train / run["train_seconds"] if run["epochs"] and run["train_seconds"] else 0.0

            print(f"| {learner} | {fp32['accuracy']:.2f} | {bf16['accuracy']:.2f} | {'yes' if agree else 'NO'} | "
                  f"{train_rate(fp32):.0f} / {train_rate(bf16):.0f} ({train_rate(fp32) / train:.2f}x) | "
                  f"{n_test / fp32['eval_seconds']:.0f} / {n_test / bf16['eval_seconds']:.0f} "
                  f"({n_test / fp32['eval_seconds'] / forward:.2f}x) | {max(fp32['peak_mb'], bf16['peak_mb']):.0f} |",
                  flush=True)
    print(f"gpu_check: {len(args.learners) - len(failures) - len(skipped)} passed, {len(failures)} failed"
          f"{f' ({failures})' if failures else ''}, {len(skipped)} not started within the budget"
          f"{f' ({skipped})' if skipped else ''}; {time.perf_counter() - started:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
