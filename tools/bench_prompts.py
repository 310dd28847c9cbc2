"""Benchmark: prompt learners' training step and evaluation against the bare backbone passes.

For each of L2P, DualPrompt and CODA-Prompt on DeiT-Tiny (real weights and CIFAR images from the
assets), in one process:

- training step: the learner's whole step (query from the frozen ViT, prompt selection, prompted
  forward, loss, backward, clipping, optimiser) against the bare passes it cannot avoid: a frozen
  forward (no grad) plus a forward and backward of the ViT with the same number of fixed prompt
  tokens / prefixes requiring grad. Target <= 1.2.
- evaluation: ``learner.predict`` over test images whose queries are cached, against one bare
  prompted forward per image (same loader, no grad). Target <= 1.1.
- memory: the weights held by the learner and the backbone, counted by storage, against one
  copy of the backbone's weights (no second ViT).

    python tools/bench_prompts.py --assets ../shared/assets
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pilot.configure import build_config
from pilot.engine import Run


def learner_config(name: str, assets: Path, batch_size: int) -> dict:
    return {"model_name": name, "dataset": "cifar224", "data_path": str(assets), "download": False,
            "backbone_type": "deit_tiny_patch16_224", "weights_dir": str(assets), "device": ["cpu"],
            "init_cls": 10, "increment": 10, "seed": [1993], "train_per_class": 8, "test_per_class": 8,
            "max_tasks": 1, "batch_size": batch_size, "eval_batch_size": batch_size, "progress": False,
            "log_dir": "/tmp/pilot-bench-prompts"}


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def bare_prompt_kwargs(run: Run, batch: int) -> dict:
    """Fixed prompts of the learner's sizes, requiring grad, in the learner's insertion mode."""
    dim, config = run.ctx.backbone.feature_dim, run.config.learner
    name = run.config.experiment.model_name

    def prefix(length: int) -> tuple:
        return (torch.zeros(batch, length, dim, requires_grad=True), torch.zeros(batch, length, dim, requires_grad=True))

    if name == "l2p":
        return {"prompt_tokens": torch.zeros(batch, config.top_k * config.length, dim, requires_grad=True)}
    if name == "dualprompt":
        blocks = {b: prefix(config.g_prompt_length) for b in config.g_prompt_layer_idx}
        return {"prefixes": {**blocks, **{b: prefix(config.length) for b in config.e_prompt_layer_idx}}}
    return {"prefixes": {b: prefix(int(config.prompt_param[1]) // 2) for b in config.prompt_layer_idx}}


def bench_learner(name: str, assets: Path, batch_size: int, repeats: int) -> dict:
    run = Run(build_config(learner_config(name, assets, batch_size)))
    learner, ctx, task = run.learner, run.ctx, run.stream.tasks[0]
    vit = ctx.backbone.model
    images, labels, _ = next(iter(ctx.train_loader(task.train, batch_size, learner.train_transform())))
    parameters = [p for p in learner.trainable() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=1e-3)
    learner.set_train_mode(True)
    step = timed(lambda: learner.train_step(images, labels, task, optimizer, parameters, learner.config.clip_grad), repeats)

    bare_handle = learner.prompts  # the same ViT and insertion mechanism, fixed prompts
    prompt_kwargs = bare_prompt_kwargs(run, len(images))

    def bare_step():
        with torch.no_grad():
            vit(images)
        with bare_handle.use(**prompt_kwargs):
            vit.forward_features(images).sum().backward()

    bare = timed(bare_step, repeats)

    test = task.test
    ctx.features(test)  # queries cached, as after the first evaluation of a run
    evaluate = timed(lambda: learner.predict(test), 1)

    def bare_eval():
        with torch.no_grad():
            for batch, _, _ in ctx.eval_loader(test):
                kwargs = bare_prompt_kwargs(run, len(batch))
                with bare_handle.use(**{k: _detached(v) for k, v in kwargs.items()}):
                    vit.forward_features(batch)

    bare_evaluate = timed(bare_eval, 1)
    return {
        "train_step_s": round(step, 3), "bare_step_s": round(bare, 3), "train_ratio": round(step / bare, 3),
        "eval_s": round(evaluate, 3), "bare_eval_s": round(bare_evaluate, 3),
        "eval_ratio": round(evaluate / bare_evaluate, 3), "eval_images": len(test),
        **memory_figures(run),
    }


def _detached(value):
    if isinstance(value, dict):
        return {k: tuple(t.detach() for t in v) for k, v in value.items()}
    return value.detach()


def memory_figures(run: Run) -> dict:
    """Bytes of distinct parameter storages reachable from the learner and the backbone."""
    backbone = {p.untyped_storage().data_ptr(): p.numel() * p.element_size() for p in run.ctx.backbone.parameters()}
    learner = {p.untyped_storage().data_ptr(): p.numel() * p.element_size() for p in run.learner.net.parameters()}
    vits = sum(isinstance(m, type(run.ctx.backbone.model)) for m in run.learner.net.modules())
    return {"backbone_weights_mb": round(sum(backbone.values()) / 2**20, 2),
            "learner_weights_mb": round(sum(v for k, v in learner.items() if k not in backbone) / 2**20, 3),
            "vit_copies": 1 + vits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default="../shared/assets")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--learners", nargs="+", default=["l2p", "dualprompt", "coda_prompt"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    figures = {"threads": torch.get_num_threads(), "batch_size": args.batch_size}
    for name in args.learners:
        figures[name] = bench_learner(name, Path(args.assets), args.batch_size, args.repeats)
        print(name, json.dumps(figures[name]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
