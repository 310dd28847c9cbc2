"""Time RanPAC's ridge algebra at full size (M = 10000 by default), in float64.

Dense G ([M, M], once more samples than M / 4 have been added): the Cholesky solve ``RidgeState``
uses, a general solve, and an eigendecomposition (what one eigh per task of G would cost).
Compact G (``B C B^T`` while the rank is within M / 4): a stream of tasks of ReLU random features,
adding each task and solving after it, as RanPAC does.

Usage: python tools/bench_ridge.py [--dim 10000] [--classes 100] [--task-samples 4000]
                                   [--tasks 10] [--compact-task-samples 200]
The dense Gram matrix is a random symmetric positive-definite stand-in (timings do not depend on content).
"""

import argparse
import time
from collections.abc import Callable

import torch

from pilot.modules.ridge import OFFICIAL_LAMBDAS, RandomProjection, RidgeState, select_lambda


def timed(label: str, work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    seconds = time.perf_counter() - start
    print(f"{label}: {seconds:.2f} s", flush=True)
    return seconds


def dense(args: argparse.Namespace, generator: torch.Generator) -> None:
    symmetric = torch.randn(args.dim, args.dim, generator=generator, dtype=torch.float64)
    gram = (symmetric + symmetric.T) / 2 + args.dim * torch.eye(args.dim, dtype=torch.float64)
    del symmetric
    class_sums = torch.randn(args.dim, args.classes, generator=generator, dtype=torch.float64)
    state = RidgeState(args.dim)
    state.load_state_dict({"num_classes": args.classes, "form": "dense",
                           "tensors": {"gram": gram, "class_sums": class_sums}})
    timed("dense G: RidgeState.solve (Cholesky)", lambda: state.solve(1.0))
    solve_seconds = timed("dense G: torch.linalg.solve(G + lam I, Q)",
                          lambda: torch.linalg.solve(gram + torch.eye(args.dim, dtype=torch.float64), class_sums))
    timed("dense G: torch.linalg.eigh(G)", lambda: torch.linalg.eigh(gram))
    print(f"official selection (one general solve per candidate, {len(OFFICIAL_LAMBDAS)} candidates): "
          f"~{solve_seconds * len(OFFICIAL_LAMBDAS):.0f} s estimated")


def compact(args: argparse.Namespace, generator: torch.Generator) -> None:
    projection = RandomProjection(192, args.dim, seed=0)
    state, adding, solving = RidgeState(args.dim), 0.0, 0.0
    for task in range(args.tasks):
        h = projection(torch.randn(args.compact_task_samples, 192, generator=generator))
        labels = torch.randint(10 * task, 10 * task + 10, (len(h),), generator=generator)
        started = time.perf_counter()
        state.add(h, labels, num_classes=10 * task + 10)
        added = time.perf_counter()
        state.solve(1e4)
        adding, solving = adding + added - started, solving + time.perf_counter() - added
    form = f"compact, rank {state.statistics.rank}" if state.is_compact else "dense"
    print(f"{args.tasks} tasks of {args.compact_task_samples} samples, G {form} at the end: "
          f"add {adding:.2f} s, solve {solving:.2f} s in all")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=10000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--task-samples", type=int, default=4000, help="current-task features for select_lambda")
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--compact-task-samples", type=int, default=200, help="samples per task in the compact stream")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, M={args.dim}, classes={args.classes}")
    generator = torch.Generator().manual_seed(0)
    compact(args, generator)
    dense(args, generator)
    features = torch.relu(torch.randn(args.task_samples, args.dim, generator=generator))
    labels = torch.randint(0, 10, (args.task_samples,), generator=generator)
    split = int(args.task_samples * 0.8)
    timed(f"select_lambda on {args.task_samples} current-task features (dual eigh, {split}x{split})",
          lambda: select_lambda(features[:split], labels[:split], features[split:], labels[split:]))


if __name__ == "__main__":
    main()
