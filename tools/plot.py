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
    sys.exit('plot: needs matplotlib: pip install -c constraints.txt -e ".[plot]" (or pip install matplotlib)')

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pilot.summary import group_key, load_runs  # noqa: E402


def label(results: dict) -> str:
    config = results["config"]
    prefix = config.get("prefix", "").strip()
    return " ".join(filter(None, [config["model_name"], prefix, f"seed {results['seed']}"]))


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def run_colours(runs: list[dict]) -> dict[int, tuple]:
    """Each run's colour (keyed by ``id``), the same in every figure; tab20 where tab10 would repeat."""
    palette = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    return {id(results): palette(i % palette.N) for i, results in enumerate(runs)}


def is_domain_stream(results: dict) -> bool:
    return results["config"].get("scenario", "class") == "domain"


def classes_seen(results: dict) -> list[int]:
    """The x-axis: classes seen after each task, or domains seen in a domain stream."""
    if is_domain_stream(results):
        return list(range(1, results["completed_tasks"] + 1))
    return np.cumsum(results["task_sizes"])[: results["completed_tasks"]].tolist()


def x_label(runs: list[dict]) -> str:
    return "domains seen" if all(is_domain_stream(r) for r in runs) else "classes seen"


def plot_curves(runs: list[dict], colours: dict[int, tuple], out: Path) -> Path:
    """The runs' accuracy curves; with a second panel of task-incremental accuracy where runs have it."""
    task_il = [r for r in runs if r.get("task_il")]
    fig, axes = plt.subplots(1, 2 if task_il else 1, figsize=(12 if task_il else 7, 4.5), squeeze=False)
    panels = [(runs, lambda r: r, "top-1 accuracy on all seen classes (%)", "Accuracy over the task stream")]
    if task_il:
        panels.append((task_il, lambda r: r["task_il"], "top-1 accuracy within each image's task (%)",
                       "Task-incremental accuracy (task known at test time)"))
    for ax, (members, block, y_label, title) in zip(axes[0], panels):
        for results in members:
            metrics = block(results)
            ax.plot(classes_seen(results), metrics["accuracy_curve"], marker="o", markersize=3, color=colours[id(results)],
                    label=f"{label(results)} (avg {metrics['average_incremental_accuracy']:.2f}, last "
                          f"{metrics['last_accuracy']:.2f})")
        ax.set(xlabel=x_label(members), ylabel=y_label, title=f"{title} ({runs[0]['config']['dataset']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save(fig, out / "accuracy_curve.png")


def plot_mean_curves(runs: list[dict], colours: dict[int, tuple], out: Path) -> Path:
    """Per group of seeds (learner, dataset, protocol, backbone, setting): mean ± std (ddof 0) at each step, in
    the colour of the group's first run."""
    groups: dict[tuple, list[dict]] = {}
    for results in runs:
        groups.setdefault(group_key(results), []).append(results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (learner, _, _, _, setting), members in sorted(groups.items()):
        steps = min(r["completed_tasks"] for r in members)
        curves = np.array([r["accuracy_curve"][:steps] for r in members])
        mean, std = curves.mean(0), curves.std(0)
        x = classes_seen(members[0])[:steps]
        colour = colours[id(members[0])]
        ax.plot(x, mean, marker="o", markersize=3, color=colour,
                label=f"{' '.join(filter(None, [learner, setting]))} ({plural(len(members), 'seed')}, last "
                      f"{mean[-1]:.2f} ± {std[-1]:.2f})")
        ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.2)
    ax.set(xlabel=x_label(runs), ylabel="top-1 accuracy on all seen classes (%)",
           title="Mean accuracy over seeds, ± one standard deviation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, out / "mean_curve.png")


def plot_forgetting(runs: list[dict], colours: dict[int, tuple], out: Path) -> Path:
    """Bars per task and run; a task forgotten by exactly 0 gets a mark at 0, where a bar would be invisible."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / len(runs)
    ax.axhline(0, color="0.4", linewidth=0.8)
    for i, results in enumerate(runs):
        values = np.array([np.nan if v is None else v for v in results["task_forgetting"]], dtype=float)
        x = np.arange(len(values)) + i * width
        colour = colours[id(results)]
        ax.bar(x, values, width, color=colour,
               label=f"{label(results)} (mean {np.nanmean(values) if len(values) else 0:.2f})")
        zero = x[values == 0]
        ax.hlines(np.zeros(len(zero)), zero - width / 2, zero + width / 2, colors=[colour], linewidth=4, zorder=3)
    tasks = max(len(r["task_forgetting"]) for r in runs)
    ax.set_xticks(np.arange(tasks) + width * (len(runs) - 1) / 2, [str(t + 1) for t in range(tasks)])
    ax.set(xlabel="task", ylabel="forgetting at the last step (points)",
           title="Per-task forgetting: best earlier accuracy minus final accuracy")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return save(fig, out / "forgetting.png")


def plot_matrix(results: dict, out: Path, name: str) -> Path:
    matrix = np.array([[np.nan if v is None else v for v in row] for row in results["accuracy_matrix"]])
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(matrix, vmin=0, vmax=100, cmap="viridis")
    steps = len(matrix)
    if steps <= 12:
        for t in range(steps):
            for j in range(t + 1):
                ax.text(j, t, f"{matrix[t, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if matrix[t, j] < 60 else "black")
    ax.set(xlabel="evaluated task j", ylabel="after learning task t", title=f"R[t][j] (%): {label(results)}")
    ax.set_xticks(range(steps), [str(t + 1) for t in range(steps)])
    ax.set_yticks(range(steps), [str(t + 1) for t in range(steps)])
    if is_domain_stream(results):  # tasks are domains: name them
        names = results["domain_order"][:steps]
        ax.set(xlabel="evaluated domain", ylabel="after learning domain")
        ax.set_xticks(range(steps), names, rotation=45, ha="right")
        ax.set_yticks(range(steps), names)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    return save(fig, out / f"accuracy_matrix_{name}.png")


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
    written = [plot_curves(runs, colours, out), plot_mean_curves(runs, colours, out), plot_forgetting(runs, colours, out)]
    # The learner's name joins the run directory's (which leaves it out), so runs of two learners never collide.
    names = [f"{r['config']['model_name']}_{d.name}" for r, d in zip(runs, run_dirs)]
    names = [n if names.count(n) == 1 else f"{i}_{n}" for i, n in enumerate(names)]
    written += [plot_matrix(r, out, n) for r, n in zip(runs, names)]
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
