"""Plot finished (or running) runs: ``python tools/plot.py <run dirs...> [--out DIR]``.

Writes accuracy_curve.png (accuracy vs classes seen, or domains seen, all runs overlaid; beside it a
task-incremental panel where runs recorded task-IL accuracy), mean_curve.png (per
learner and setting, the mean curve over seeds with a ±std band), forgetting.png (per-task
forgetting at the last step, runs side by side) and accuracy_matrix_<learner>_<run>.png (one heatmap
per run). A directory argument may hold many runs: every results.json below it is used. Tasks are
numbered from 1, as on the console; a run keeps its colour in every figure.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import matplotlib
except ImportError:
    sys.exit('plot: needs matplotlib: pip install -c constraints.txt -e ".[plots]" (or pip install matplotlib)')

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pilot.plots import draw_curves, draw_forgetting, draw_matrix, draw_mean_curves, run_colours  # noqa: E402
from pilot.summary import load_runs  # noqa: E402


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (holding results.json) or folders of runs")
    parser.add_argument("--out", default=None, help="where to write the PNGs (default: the first run's directory)")
    args = parser.parse_args(argv)
    run_dirs, runs = load_runs(args.runs)
    if not runs:
        print(f"plot: no results.json under {', '.join(args.runs)}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else run_dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    colours = run_colours(runs)
    written = [save(draw_curves(runs, colours), out / "accuracy_curve.png"),
               save(draw_mean_curves(runs, colours), out / "mean_curve.png"),
               save(draw_forgetting(runs, colours), out / "forgetting.png")]
    # The learner's name joins the run directory's (which leaves it out), so runs of two learners never collide.
    names = [f"{r['config']['model_name']}_{d.name}" for r, d in zip(runs, run_dirs)]
    names = [n if names.count(n) == 1 else f"{i}_{n}" for i, n in enumerate(names)]
    written += [save(draw_matrix(r), out / f"accuracy_matrix_{n}.png") for r, n in zip(runs, names)]
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
