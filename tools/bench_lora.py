"""Benchmark: a training step of the ViT with LoRA against the bare backbone's forward and backward.

The LoRA block (``pilot.modules.lora``) computes its low-rank products on the input the ``qkv`` Linear already
gets, inside that Linear's forward hook: no second pass through the backbone. This measures what it costs.
Both steps train a linear head on the [CLS] feature of the same frozen ViT, on the same batch, with Adam:

- bare: images (with ``requires_grad``, so the backward runs through every block, as LoRA's must) -> ViT ->
  head -> cross-entropy -> backward -> step;
- LoRA: the same, with a rank-``--rank`` pair on the q, k and v slices of every block's qkv (B drawn
  N(0, 0.02) so no product is skipped), trained beside the head.

Rounds alternate the two in this one process (and which goes first), after one uncounted warm-up round,
so that drifts in machine speed hit both; the ratio is of the totals. Target: LoRA / bare <= 1.15 at
rank 8. Usage (DeiT-Tiny from the assets; a random ViT-S/16 when the weights are absent):

    python tools/bench_lora.py --assets ../shared/assets [--rank 8] [--batch 16] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from pilot.backbones import create_backbone
from pilot.modules.lora import attach_lora


def make_vit(assets: Path) -> tuple[nn.Module, str]:
    if (assets / "deit_tiny_patch16_224.safetensors").is_file():
        return create_backbone("deit_tiny_patch16_224", weights_dir=str(assets)).model, "deit_tiny_patch16_224 (assets)"
    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0), "vit_small_patch16_224 (random)"


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def timed_steps(vit: nn.Module, head: nn.Module, extra: list[nn.Parameter], images: torch.Tensor,
                labels: torch.Tensor, steps: int, clock=time.perf_counter) -> float:
    optimizer = torch.optim.Adam(list(head.parameters()) + extra, lr=1e-4)
    synchronize = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    synchronize()
    started = clock()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(head(vit(images.requires_grad_(True))), labels)
        loss.backward()
        optimizer.step()
    synchronize()
    return clock() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default="../shared/assets", help="folder with the DeiT-Tiny weights")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="training steps per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="alternate bare / LoRA this many times")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or this process's CPU time (steadier on a CPU shared with other work)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    vit, model = make_vit(Path(args.assets))
    vit = vit.to(device).eval().requires_grad_(False)
    head = nn.Linear(vit.num_features, 10).to(device)
    images = torch.randn(args.batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    lora = attach_lora(vit, ("q", "k", "v"))
    index = lora.add_pair(args.rank)
    lora.to(device)
    with torch.no_grad():
        for up in lora.pair_parameters(index, ("up",)):
            up.normal_(std=0.02)
    trained = lora.pair_parameters(index)
    def measure(with_lora: bool) -> float:
        lora.enabled = with_lora
        return timed_steps(vit, head, trained if with_lora else [], images, labels, args.steps, CLOCKS[args.clock])

    measure(False), measure(True)  # a warm-up round, not counted: allocator, kernels for the new shapes
    bare_times, lora_times = [], []
    for round_index in range(args.rounds):
        if round_index % 2:  # alternate which goes first, so a drift within a round favours neither
            lora_times.append(measure(True))
            bare_times.append(measure(False))
        else:
            bare_times.append(measure(False))
            lora_times.append(measure(True))
        print(f"round {round_index + 1}: bare {bare_times[-1]:.2f}s, LoRA {lora_times[-1]:.2f}s, "
              f"ratio {lora_times[-1] / bare_times[-1]:.3f}")
    figures = {
        "model": model, "device": str(device), "clock": args.clock, "threads": torch.get_num_threads(), "rank": args.rank,
        "slices": list(lora.slices), "batch": args.batch, "steps_per_round": args.steps, "rounds": args.rounds,
        "bare_seconds": round(sum(bare_times), 3), "lora_seconds": round(sum(lora_times), 3),
        "ratio_lora_over_bare": round(sum(lora_times) / sum(bare_times), 3),
    }
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
