"""``pilot select``: choose the backbone before the stream, from one forward pass per candidate.

Each candidate (any ``backbone_type``, ``random:<name>`` for its randomly initialised baseline,
``<name>@<k>`` for its first k blocks) encodes the first ``tasks`` tasks' training images through the
feature store (its own weights and preprocessing; with ``feature_cache_dir`` the run that follows
reuses them), and the estimators of ``pilot.transferability`` score its features. The ranking,
best first, follows one estimator (``rank_by``); every score is kept.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pilot.assembly import build_backbone, load_stream, make_context, resolve_device, seed_everything
from pilot.backbones import source_classifier
from pilot.config import RunConfig
from pilot.data import Split, TaskStream
from pilot.errors import PilotError
from pilot.outputs import write_json
from pilot.results import versions
from pilot.transferability import ESTIMATORS, leep

SCORES = (*ESTIMATORS, "leep")
HEADINGS = {"logme": "LogME", "h_score": "H-score", "ncm_accuracy": "NCM LOO %", "leep": "LEEP"}


def first_tasks(stream: TaskStream, tasks: int) -> Split:
    """The training images of the stream's first ``tasks`` tasks, as one split."""
    if not 1 <= tasks <= len(stream):
        raise PilotError(f"--tasks must be between 1 and the stream's {len(stream)} tasks, got {tasks}.")
    parts = [task.train for task in stream.tasks[:tasks]]
    return Split("train", parts[0].source, np.concatenate([p.indices for p in parts]),
                 np.concatenate([p.labels for p in parts]))


def select(config: RunConfig, candidates: list[str], tasks: int = 1, rank_by: str = "logme",
           report: Callable[[str], None] = print) -> dict[str, Any]:
    """Score each candidate on the config's data; returns the selection (``ranking`` best first)."""
    if rank_by not in SCORES:
        raise PilotError(f"--rank-by must be one of {', '.join(SCORES)}, got '{rank_by}'.")
    if not candidates or len(set(candidates)) != len(candidates):
        raise PilotError("--candidates needs one or more distinct backbones, comma-separated.")
    started = time.perf_counter()
    exp = config.experiment
    seed = exp.seed[0]
    dataset, stream = load_stream(exp, seed, ("train",))
    split = first_tasks(stream, tasks)
    labels = torch.as_tensor(split.labels)
    device = resolve_device(exp.device)
    rows = []
    for spec in candidates:
        report(f"{spec}: encoding {len(split)} images of the first {tasks} task(s)")
        rows.append(score_candidate(config, spec, dataset, stream, split, labels, device))
    best_first = sorted(rows, key=lambda row: np.inf if row["scores"][rank_by] is None else -row["scores"][rank_by])
    return {
        "config": {k: v for k, v in config.to_flat_dict().items() if k != "backbone_type"},
        "tasks": tasks, "images": len(split), "classes": len(labels.unique()), "rank_by": rank_by,
        "ranking": [row["backbone"] for row in best_first],
        "rankings": {name: [row["backbone"] for row in sorted((r for r in rows if r["scores"][name] is not None),
                                                               key=lambda row: -row["scores"][name])] for name in SCORES},
        "candidates": rows, "seconds": time.perf_counter() - started, "versions": versions(),
    }


def score_candidate(config: RunConfig, spec: str, dataset, stream: TaskStream, split: Split, labels: torch.Tensor,
                    device: torch.device) -> dict[str, Any]:
    exp = config.experiment
    seed = exp.seed[0]
    seed_everything(seed)  # as a run does before building its backbone
    backbone = build_backbone(exp, seed, spec)
    ctx = make_context(exp, backbone, dataset, stream, device, torch.Generator().manual_seed(seed))
    encoding = time.perf_counter()
    features = ctx.features(split)
    seconds = time.perf_counter() - encoding
    scores = {name: estimate(features, labels) for name, estimate in ESTIMATORS.items()}
    head = source_classifier(spec, exp.pretrained, exp.weights_dir, seed, **exp.backbone_args)
    with torch.no_grad():
        scores["leep"] = None if head is None else leep(torch.softmax(head(features), dim=1), labels)
    return {"backbone": spec, "identity": backbone.identity, "feature_dim": backbone.feature_dim,
            "encoded_images": ctx.encoded_images, "encode_seconds": seconds,
            "images_per_second": ctx.encoded_images / seconds if ctx.encoded_images else None, "scores": scores}


def table(selection: dict[str, Any]) -> str:
    """The candidates in ranking order, one Markdown row each."""
    by_name = {row["backbone"]: row for row in selection["candidates"]}
    lines = ["| rank | backbone | " + " | ".join(HEADINGS[name] for name in SCORES) + " | dim | encode s | images/s |",
             "|---" * (len(SCORES) + 5) + "|"]
    for rank, name in enumerate(selection["ranking"], 1):
        row = by_name[name]
        scores = " | ".join("n/a" if row["scores"][s] is None else f"{row['scores'][s]:.4g}" for s in SCORES)
        speed = "cached" if row["images_per_second"] is None else f"{row['images_per_second']:.1f}"
        lines.append(f"| {rank} | {name} | {scores} | {row['feature_dim']} | {row['encode_seconds']:.1f} | {speed} |")
    return "\n".join(lines)


def default_output(config: RunConfig, config_path: str) -> Path:
    return Path(config.experiment.log_dir) / "selection" / Path(config_path).stem / "selection.json"


def write_selection(selection: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, selection)

