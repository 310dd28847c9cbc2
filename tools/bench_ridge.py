"""Time RanPAC's ridge algebra at full size: eigh of an [M, M] float64 Gram matrix vs a direct solve.

Usage: python tools/bench_ridge.py [--dim 10000] [--classes 100] [--task-samples 4000]
The Gram matrix is a random symmetric positive-definite stand-in (timings do not depend on content).
"""

import argparse
import time
from collections.abc import Callable

import torch

from pilot.ridge import OFFICIAL_LAMBDAS, select_lambda


def timed(label: str, work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    seconds = time.perf_counter() - start
    print(f"{label}: {seconds:.1f} s", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dim", type=int, default=10000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--task-samples", type=int, default=4000, help="current-task features for select_lambda")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, M={args.dim}, classes={args.classes}")

    generator = torch.Generator().manual_seed(0)
    symmetric = torch.randn(args.dim, args.dim, generator=generator, dtype=torch.float64)
    gram = (symmetric + symmetric.T) / 2 + args.dim * torch.eye(args.dim, dtype=torch.float64)
    del symmetric
    class_sums = torch.randn(args.dim, args.classes, generator=generator, dtype=torch.float64)
    identity = torch.eye(args.dim, dtype=torch.float64)

    solve_seconds = timed("torch.linalg.solve(G + lam I, Q)", lambda: torch.linalg.solve(gram + identity, class_sums))
    timed("torch.linalg.eigh(G)", lambda: torch.linalg.eigh(gram))
    print(f"official selection (one solve per candidate, {len(OFFICIAL_LAMBDAS)} candidates): "
          f"~{solve_seconds * len(OFFICIAL_LAMBDAS):.0f} s estimated")

    features = torch.relu(torch.randn(args.task_samples, args.dim, generator=generator))
    labels = torch.randint(0, 10, (args.task_samples,), generator=generator)
    split = int(args.task_samples * 0.8)
    timed(f"select_lambda on {args.task_samples} current-task features (dual eigh, {split}x{split})",
          lambda: select_lambda(features[:split], labels[:split], features[split:], labels[split:]))


if __name__ == "__main__":
    main()
