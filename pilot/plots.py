"""Figures of runs from their results.json records: the accuracy curves (with a task-incremental panel), the
mean curve over seeds with a ±std band, per-task forgetting and the accuracy matrix. Each draws on the axes it
is given, or on a new figure, and returns the figure: ``tools/plot.py`` saves them as PNGs, and
``RunResult.plot``/``ResultSet.plot`` draw them in a notebook. Tasks are numbered from 1, as on the console;
a run keeps its colour in every figure of one call.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from pilot.errors import PilotError
from pilot.summary import group_key


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise PilotError('Figures need matplotlib: pip install -c constraints.txt -e ".[plots]" '
                         '(or pip install matplotlib).') from None
    return plt


def _axes(ax, panels: int = 1, size: tuple = (7, 4.5)):
    """The figure and the axes to draw on: ``ax``'s, or a new figure's ``panels`` side by side."""
    if ax is not None:
        return ax.figure, [ax]
    fig, axes = _pyplot().subplots(1, panels, figsize=size, squeeze=False)
    return fig, list(axes[0])


def label(results: dict) -> str:
    config = results["config"]
    prefix = config.get("prefix", "").strip()
    return " ".join(filter(None, [config["model_name"], prefix, f"seed {results['seed']}"]))


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def run_colours(runs: list[dict]) -> dict[int, tuple]:
    """Each run's colour (keyed by ``id``), the same in every figure; tab20 where tab10 would repeat."""
    palette = _pyplot().get_cmap("tab10" if len(runs) <= 10 else "tab20")
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


def draw_curves(runs: list[dict], colours: dict[int, Optional[tuple]], ax=None):
    """The runs' accuracy curves; on a new figure, with a second panel of task-incremental accuracy where runs
    have it; on ``ax``, the first panel alone (curves of several calls overlay)."""
    task_il = [r for r in runs if r.get("task_il")] if ax is None else []
    fig, axes = _axes(ax, panels=2 if task_il else 1, size=(12 if task_il else 7, 4.5))
    panels = [(runs, lambda r: r, "top-1 accuracy on all seen classes (%)", "Accuracy over the task stream")]
    if task_il:
        panels.append((task_il, lambda r: r["task_il"], "top-1 accuracy within each image's task (%)",
                       "Task-incremental accuracy (task known at test time)"))
    for ax, (members, block, y_label, title) in zip(axes, panels):
        for results in members:
            metrics = block(results)
            ax.plot(classes_seen(results), metrics["accuracy_curve"], marker="o", markersize=3, color=colours[id(results)],
                    label=f"{label(results)} (avg {metrics['average_incremental_accuracy']:.2f}, last "
                          f"{metrics['last_accuracy']:.2f})")
        ax.set(xlabel=x_label(members), ylabel=y_label, title=f"{title} ({runs[0]['config']['dataset']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def draw_mean_curves(runs: list[dict], colours: dict[int, tuple], ax=None):
    """Per group of seeds (learner, dataset, protocol, backbone, setting): mean ± std (ddof 0) at each step, in
    the colour of the group's first run."""
    groups: dict[tuple, list[dict]] = {}
    for results in runs:
        groups.setdefault(group_key(results), []).append(results)
    fig, (ax,) = _axes(ax)
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
    return fig


def draw_forgetting(runs: list[dict], colours: dict[int, tuple], ax=None):
    """Bars per task and run; a task forgotten by exactly 0 gets a mark at 0, where a bar would be invisible."""
    fig, (ax,) = _axes(ax)
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
    return fig


def draw_matrix(results: dict, ax=None):
    """R[t, j], the accuracy on task j after learning task t, as a heatmap (domains named in a domain stream)."""
    matrix = np.array([[np.nan if v is None else v for v in row] for row in results["accuracy_matrix"]])
    fig, (ax,) = _axes(ax, size=(6, 5))
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
    return fig
