"""Tables over runs: ``pilot summarize <run dirs, folders of runs, or sweep dirs>``.

One row per (learner, dataset, protocol, backbone, setting) with the mean ± standard deviation over
its seeds of Ā, last accuracy and forgetting, and task-incremental Ā and last accuracy (the same
runs' logits restricted to each image's task; "-" for domain streams), as Markdown (printed), CSV
and LaTeX. The setting is
the run's ``prefix``, where a sweep writes its grid point. Standard deviations are NumPy's default
(population, ddof 0), as printed under every table.

Runs with a validation split (val_fraction, val_per_class) add a "val Ā" column; ``--select val`` keeps,
of each learner, dataset, protocol and backbone, the setting of the best mean validation Ā, chosen without
reading test accuracy. Runs of one row must have read the same data: where their results.json record
different dataset manifests (``pilot data get``), the table is refused.
"""
from __future__ import annotations

import csv
import io
import json
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

from pilot.config import backbone_label
from pilot.errors import PilotError

METRICS = (("average_incremental_accuracy", "Ā"), ("last_accuracy", "last"), ("forgetting", "forgetting"),
           ("task_il.average_incremental_accuracy", "task-IL Ā"), ("task_il.last_accuracy", "task-IL last"))
# Ā on the validation images: a column where some run has them.
VALIDATION = ("validation.average_incremental_accuracy", "val Ā")


def metric(results: dict, key: str) -> Optional[float]:
    """``results[key]``, where a dotted key reads a nested block (None where the run has none)."""
    value = results
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def find_runs(paths: list[str]) -> list[Path]:
    """Run directories: each path that holds results.json, every one below a folder, a sweep's runs."""
    found = []
    for path in map(Path, paths):
        if (path / "results.json").is_file():
            found.append(path)
            continue
        swept = _sweep_runs(path / "sweep.json") if (path / "sweep.json").is_file() else None
        if swept is not None:
            found += [d for d in swept if (d / "results.json").is_file()]
        elif path.is_dir():
            found += sorted(p.parent for p in path.rglob("results.json"))
    return list(dict.fromkeys(found))


def _sweep_runs(path: Path) -> Optional[list[Path]]:
    """The run directories a sweep.json lists; None (with a warning: the folder is searched instead) where
    it is damaged."""
    try:
        return [Path(d) for d in json.loads(path.read_text(encoding="utf-8"))["run_dirs"]]
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as err:
        warnings.warn(f"'{path}' cannot be read ({type(err).__name__}: {err}): searching its folder for "
                      f"results.json instead.", stacklevel=3)
        return None


def load_runs(paths: list[str]) -> tuple[list[Path], list[dict]]:
    """The run directories under ``paths`` and their results.json contents; a results.json that cannot be
    summarized is skipped with a warning naming it."""
    loaded = [(d, read_results(d / "results.json")) for d in find_runs(paths)]
    usable = [(d, results) for d, results in loaded if results is not None]
    return [d for d, _ in usable], [results for _, results in usable]


# What summarize and the run table read: every record pilot writes has them (failed runs' too).
NEEDED = ("status", "seed", "config", "accuracy_curve", "average_incremental_accuracy", "last_accuracy",
          "forgetting", "timings", "peak_memory")
NEEDED_CONFIG = ("model_name", "dataset", "init_cls", "increment", "backbone_type")


def read_results(path: Path) -> Optional[dict]:
    """The record in ``path``, or None (with a warning) where it is truncated (a full disk, a copy cut
    short), not a run's record, or lacks what a table needs: one bad file must not hide the others."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return _skip(path, f"it cannot be read as JSON ({err})")
    if not isinstance(results, dict):
        return _skip(path, f"it holds a JSON {type(results).__name__}, not a run's record")
    config = results.get("config")
    missing = [key for key in NEEDED if key not in results]
    missing += [f"config.{key}" for key in NEEDED_CONFIG if not isinstance(config, dict) or key not in config]
    if missing:
        return _skip(path, f"it lacks {', '.join(missing)}")
    return results


def _skip(path: Path, reason: str) -> None:
    warnings.warn(f"skipping '{path}': {reason}.", stacklevel=3)


def protocol(config: dict) -> str:
    """B<base> Inc<increment> (a domain stream: its domains; task-IL: marked), and the subset and task limit
    where the run used them."""
    base = 0 if config["init_cls"] == config["increment"] else config["init_cls"]
    scenario = config.get("scenario", "class")
    parts = ([f"domains {'>'.join(config['domain_order']) or 'shuffled'}"] if scenario == "domain"
             else [f"{'task-IL ' if scenario == 'task' else ''}B{base} Inc{config['increment']}"])
    if config.get("train_per_class") or config.get("test_per_class"):
        parts.append(f"{config.get('train_per_class') or 'all'}/{config.get('test_per_class') or 'all'} per class")
    if config.get("max_tasks"):
        parts.append(f"{config['max_tasks']} tasks")
    return ", ".join(parts)


def group_key(results: dict) -> tuple[str, str, str, str, str]:
    config = results["config"]
    return (config["model_name"], config["dataset"], protocol(config), backbone_label(config["backbone_type"]),
            config.get("prefix", "").strip())


def summarize(runs: list[dict]) -> list[dict]:
    """One row per group of complete runs: seeds, then mean and std of each metric (None where undefined)."""
    groups = defaultdict(list)
    for results in runs:
        if results.get("status") == "complete":
            groups[group_key(results)].append(results)
    rows = []
    validated = any(metric(r, VALIDATION[0]) is not None for members in groups.values() for r in members)
    for (learner, dataset, proto, backbone, setting), members in sorted(groups.items()):
        _require_one_manifest(members, f"{learner} on {dataset} ({proto}, {backbone}{', ' + setting if setting else ''})")
        row = {"learner": learner, "dataset": dataset, "protocol": proto, "backbone": backbone,
               "setting": setting, "seeds": sorted(r["seed"] for r in members)}
        for key, _ in METRICS + ((VALIDATION,) if validated else ()):
            values = [metric(r, key) for r in members if metric(r, key) is not None]
            row[key] = (float(np.mean(values)), float(np.std(values))) if values else None
        rows.append(row)
    return rows


def _require_one_manifest(members: list[dict], row: str) -> None:
    """The runs of one row read the same prepared data: one dataset manifest digest among those recorded."""
    seeds: dict[str, list] = defaultdict(list)
    for results in members:
        if results.get("dataset_manifest"):
            seeds[results["dataset_manifest"]].append(results["seed"])
    if len(seeds) > 1:
        found = "; ".join(f"manifest {digest[:16]} (seeds {', '.join(map(str, sorted(s)))})" for digest, s in seeds.items())
        raise PilotError(f"The runs of {row} read different data: {found}. Their numbers are not comparable (another "
                         f"split or changed files; 'pilot data verify' names what differs): summarize each data "
                         f"version's runs on their own, or run them all again on one.")


def select_by_validation(rows: list[dict]) -> list[dict]:
    """Of each learner, dataset, protocol and backbone, the row (setting) of the best mean validation Ā: chosen
    without reading test accuracy."""
    missing = [row for row in rows if row.get(VALIDATION[0]) is None]
    if missing:
        first = missing[0]
        raise PilotError(f"--select val needs validation accuracy, and the runs of {first['learner']} on "
                         f"{first['dataset']} (setting '{first['setting']}') have none: run them with val_fraction "
                         f"(e.g. 0.1) or val_per_class set.")
    best: dict[tuple, dict] = {}
    for row in rows:
        key = (row["learner"], row["dataset"], row["protocol"], row["backbone"])
        if key not in best or row[VALIDATION[0]][0] > best[key][VALIDATION[0]][0]:
            best[key] = row
    return list(best.values())


def _metrics(rows: list[dict]) -> tuple:
    """The table's metrics: the validation column where a row has it."""
    return METRICS + ((VALIDATION,) if any(VALIDATION[0] in row for row in rows) else ())


def _cell(value: Optional[tuple[float, float]], plus_minus: str = "±") -> str:
    return "-" if value is None else f"{value[0]:.2f} {plus_minus} {value[1]:.2f}"


COLUMNS = ["learner", "dataset", "protocol", "backbone", "setting", "seeds"]


def markdown(rows: list[dict]) -> str:
    shown = _metrics(rows)
    header = COLUMNS + [name for _, name in shown]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for row in rows:
        cells = [str(row[c]) for c in COLUMNS[:-1]] + [str(len(row["seeds"]))]
        lines.append("| " + " | ".join(cells + [_cell(row[key]) for key, _ in shown]) + " |")
    return "\n".join(lines) + "\n\nmean ± std over seeds (NumPy's std, ddof 0)\n"


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    shown = _metrics(rows)
    writer.writerow(COLUMNS + [f"{key}_{stat}" for key, _ in shown for stat in ("mean", "std")])
    for row in rows:
        stats = [x for key, _ in shown for x in (row[key] or ("", ""))]
        writer.writerow([row[c] for c in COLUMNS[:-1]] + [" ".join(map(str, row["seeds"]))] + stats)
    return buffer.getvalue()


def _latex_escape(text: str) -> str:
    return "".join("\\" + char if char in "&%$#_{}" else char for char in text)


def latex(rows: list[dict]) -> str:
    shown = _metrics(rows)
    lines = [r"\begin{tabular}{lllllr" + "c" * len(shown) + "}", r"\toprule",
             " & ".join(["Learner", "Dataset", "Protocol", "Backbone", "Setting", "Seeds"]
                        + [r"$\bar{A}$", "Last", "Forgetting", r"Task-IL $\bar{A}$", "Task-IL last"]
                        + ([r"Val $\bar{A}$"] if len(shown) > len(METRICS) else [])) + r" \\",
             r"\midrule"]
    for row in rows:
        cells = [_latex_escape(str(row[c])) for c in COLUMNS[:-1]] + [str(len(row["seeds"]))]
        cells += ["-" if row[key] is None else f"${row[key][0]:.2f} \\pm {row[key][1]:.2f}$" for key, _ in shown]
        lines.append(" & ".join(cells) + r" \\")
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"]) + "\n"


def _number(value: Optional[float]) -> str:
    """Two decimals; "-" where a run has no value (forgetting after one task, any metric before the first)."""
    return "-" if value is None else f"{value:.2f}"


def run_table(runs: list[dict]) -> str:
    """One row per run: its curve and metrics, train and eval seconds, peak host memory."""
    lines = ["| learner | setting | seed | accuracy after each task (%) | Ā | last | forgetting | train s | eval s "
             "| peak RSS MB |", "|---" * 10 + "|"]
    for results in runs:
        config, timings = results["config"], results["timings"]
        curve = ", ".join(f"{a:.1f}" for a in results["accuracy_curve"])
        lines.append(f"| {config['model_name']} | {config.get('prefix', '').strip()} | {results['seed']} | {curve} | "
                     f"{_number(results['average_incremental_accuracy'])} | {_number(results['last_accuracy'])} | "
                     f"{_number(results['forgetting'])} | {timings['train_seconds']:.0f} | "
                     f"{timings['eval_seconds']:.0f} | {results['peak_memory']['host_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"
