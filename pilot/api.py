"""pilot as a library: run, load, evaluate and summarize from a notebook or a script.

Runs start where the command line starts them (``engine.run_experiment``): the same validation, run
directory, lock, checkpoints and results.json. Every fault of the input raises a ``PilotError`` (the
command line alone turns it into an exit code); Ctrl-C leaves a run that ``resume=True`` continues.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union, cast

import numpy as np

from pilot.config import RunConfig, load_raw
from pilot.errors import PilotError

if TYPE_CHECKING:
    import pandas

ConfigSource = Union[str, Path, dict[str, Any], RunConfig]
ROW_FIELDS = ("task", "classes_seen", "accuracy", "old_accuracy", "new_accuracy", "average_incremental_accuracy",
              "forgetting", "train_seconds", "eval_seconds")


@dataclass(frozen=True)
class TaskRecord:
    """One task's line of results.json (``per_task``): the named metrics, and the rest as ``extra``
    (task-IL accuracy, per-class accuracy, the memory, a learner's own report)."""

    task: int  # numbered from 1, as on the console and in metrics.csv
    classes_seen: int
    accuracy: float
    old_accuracy: Optional[float]
    new_accuracy: Optional[float]
    average_incremental_accuracy: float
    forgetting: Optional[float]
    train_seconds: float
    eval_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "TaskRecord":
        named: dict[str, Any] = {key: row.get(key) for key in ROW_FIELDS}
        return cls(**named, extra={key: value for key, value in row.items() if key not in ROW_FIELDS})


@dataclass(frozen=True)
class RunResult:
    """One seed's run, as its results.json records it."""

    run_dir: Path
    record: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return cast("dict[str, Any]", self.record["config"])

    @property
    def seed(self) -> int:
        return cast("int", self.record["seed"])

    @property
    def status(self) -> str:
        return cast("str", self.record["status"])

    @property
    def curve(self) -> list[float]:
        return cast("list[float]", self.record["accuracy_curve"])

    @property
    def average(self) -> Optional[float]:
        return cast("Optional[float]", self.record["average_incremental_accuracy"])

    @property
    def last(self) -> Optional[float]:
        return cast("Optional[float]", self.record["last_accuracy"])

    @property
    def forgetting(self) -> Optional[float]:
        return cast("Optional[float]", self.record["forgetting"])

    @property
    def matrix(self) -> np.ndarray:
        """``R[t, j]``: accuracy on task j's test images after learning task t (NaN for tasks not seen yet)."""
        return np.array(self.record["accuracy_matrix"], dtype=float)

    @property
    def per_task(self) -> list[TaskRecord]:
        return [TaskRecord.from_row(row) for row in self.record["per_task"]]

    def to_frame(self) -> "pandas.DataFrame":
        """The per-task table as a pandas DataFrame (``pip install pandas``)."""
        pandas = _pandas()
        return pandas.DataFrame([{key: row.get(key) for key in ROW_FIELDS} for row in self.record["per_task"]])

    def plot(self, kind: str = "curve", ax: Any = None) -> Any:
        """A matplotlib figure of this run: ``"curve"`` (accuracy after each task; on ``ax``, curves of several
        calls overlay), ``"matrix"`` (R[t, j]) or ``"forgetting"`` (per task), as ``tools/plot.py`` draws them."""
        from pilot import plots

        runs = [self.record]
        if kind == "curve":  # on given axes, the axes' next colour, so that several runs' curves differ
            colours: dict[int, Any] = {id(self.record): None} if ax is not None else plots.run_colours(runs)
            return plots.draw_curves(runs, colours, ax)
        if kind == "matrix":
            return plots.draw_matrix(self.record, ax)
        if kind == "forgetting":
            return plots.draw_forgetting(runs, plots.run_colours(runs), ax)
        raise PilotError(f"plot kind must be 'curve', 'matrix' or 'forgetting', got {kind!r}.")

    def __repr__(self) -> str:
        average = "-" if self.average is None else f"{self.average:.2f}"
        last = "-" if self.last is None else f"{self.last:.2f}"
        return (f"RunResult({self.config['model_name']}, seed {self.seed}, {self.status}: Ā {average}, last {last}, "
                f"{len(self.curve)} tasks, {self.run_dir})")


@dataclass(frozen=True)
class ResultSet:
    """The runs of several seeds of one config: each one's result, and their mean and spread per task."""

    runs: list[RunResult]

    def __len__(self) -> int:
        return len(self.runs)

    def __getitem__(self, index: int) -> RunResult:
        return self.runs[index]

    def _stack(self, values: list[Optional[float]]) -> tuple[float, float]:
        """(mean, std) of the defined values (population std, as `pilot summarize` prints); NaN if none is."""
        known = [value for value in values if value is not None]
        return (float(np.mean(known)), float(np.std(known))) if known else (float("nan"), float("nan"))

    @property
    def average(self) -> tuple[float, float]:
        """Ā over the seeds: (mean, std)."""
        return self._stack([run.average for run in self.runs])

    @property
    def last(self) -> tuple[float, float]:
        return self._stack([run.last for run in self.runs])

    @property
    def forgetting(self) -> tuple[float, float]:
        return self._stack([run.forgetting for run in self.runs])

    @property
    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """The accuracy after each task over the seeds: (mean per task, std per task)."""
        curves = np.array([run.curve for run in self.runs], dtype=float)
        return curves.mean(axis=0), curves.std(axis=0)

    def to_frame(self) -> "pandas.DataFrame":
        """One row per seed and task (``pip install pandas``)."""
        pandas = _pandas()
        return pandas.concat([run.to_frame().assign(seed=run.seed) for run in self.runs], ignore_index=True)

    def plot(self, kind: str = "curve", ax: Any = None) -> Any:
        """A matplotlib figure of the seeds: ``"curve"`` (the mean curve with a ±std band) or ``"forgetting"``
        (per task, seeds side by side), as ``tools/plot.py`` draws them."""
        from pilot import plots

        records = [run.record for run in self.runs]
        if kind == "curve":
            return plots.draw_mean_curves(records, plots.run_colours(records), ax)
        if kind == "forgetting":
            return plots.draw_forgetting(records, plots.run_colours(records), ax)
        raise PilotError(f"plot kind must be 'curve' or 'forgetting', got {kind!r}.")

    def __repr__(self) -> str:
        mean, std = self.average
        return f"ResultSet({len(self.runs)} seeds: Ā {mean:.2f} ± {std:.2f})"


def run(config: ConfigSource, *, seeds: Optional[list[int]] = None, resume: bool = False, restart: bool = False,
        progress: bool = True, on_task_end: Optional[Callable[[RunResult], None]] = None,
        **overrides: Any) -> Union[RunResult, ResultSet]:
    """Run ``config`` (a JSON path, a dict of PILOT-style keys, or a ``RunConfig``) as ``python main.py`` runs
    it; ``overrides`` are ``--set`` values (``pilot.run("exps/l2p.json", tuned_epoch=1)``). ``on_task_end``
    is called after each task with the result so far (a live plot in a notebook). One seed gives a
    ``RunResult``, several a ``ResultSet``."""
    from pilot.engine import run_experiment

    overrides = {**overrides, "progress": progress, **({"seed": list(seeds)} if seeds is not None else {})}
    built = _build(config, overrides)
    # Results are read back from results.json, so a run's result is what pilot.load gives for it later.
    notify = None if on_task_end is None else (lambda run_dir, record: on_task_end(load(run_dir)))
    results = [load(result["run_dir"]) for result in run_experiment(built, resume=resume, restart=restart,
                                                                     on_task_end=notify)]
    return results[0] if len(results) == 1 else ResultSet(results)


def _build(config: ConfigSource, overrides: dict[str, Any]) -> RunConfig:
    from pilot.configure import build_config

    if isinstance(config, RunConfig):
        raw = config.to_flat_dict()
    elif isinstance(config, dict):
        raw = dict(config)
    elif isinstance(config, (str, Path)):
        raw = load_raw(config)
    else:
        raise PilotError(f"pilot.run takes a config file's path, a dict of config keys or a RunConfig, "
                         f"not {type(config).__name__}.")
    return build_config(raw, overrides)


def load(run_dir: Union[str, Path]) -> RunResult:
    """The run recorded in ``run_dir`` (its results.json), finished or not."""
    from pilot.summary import read_results

    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise PilotError(f"'{run_dir}' holds no results.json: pass a run directory (the folder `pilot` printed "
                         f"at the end of the run).")
    record = read_results(path)
    if record is None:
        raise PilotError(f"'{path}' is damaged (not a pilot results record): run the config again with --restart.")
    return RunResult(Path(run_dir), record)


def evaluate(run_dir: Union[str, Path], **overrides: Any) -> dict[str, Any]:
    """Score a finished run's checkpoint again (``pilot evaluate``), on its own test data or, with
    ``data_path=...`` and other data keys, on another copy of it."""
    from pilot.evaluation import evaluate_run

    return evaluate_run(run_dir, overrides)


def summarize(*paths: Union[str, Path]) -> "pandas.DataFrame":
    """The table ``pilot summarize`` prints for run directories, folders of runs or sweeps, as a pandas
    DataFrame: one row per learner, dataset, protocol, backbone and setting; (mean, std) per metric."""
    from pilot.summary import load_runs, summarize as summary_rows

    pandas = _pandas()
    return pandas.DataFrame(summary_rows(load_runs([str(path) for path in paths])[1]))


def list_learners() -> dict[str, str]:
    """Every registered learner's name, with the first line of its description. (Not ``pilot.learners``:
    that is the package learners register in.)"""
    from pilot.learners import learner_class, learner_names

    return {name: _first_line(learner_class(name)) for name in learner_names()}


def config_for(name: str) -> list[dict[str, Any]]:
    """The settings of learner ``name``: each field of its typed config with its type, default and the
    comment that explains it (the source's ``#`` line above or beside the field)."""
    from pilot.learners import learner_class

    config_class: type = getattr(learner_class(name), "config_class")
    notes = _field_comments(config_class)
    return [{"key": item.name, "type": _type_text(item.type), "default": _default(item),
             "description": notes.get(item.name, "")} for item in dataclasses.fields(config_class)]


def _first_line(cls: type) -> str:
    import inspect

    # The class's own docstring, else its module's: inspect.getdoc(cls) would fall back to a parent learner's.
    doc = inspect.cleandoc(cls.__doc__ or "") or inspect.getdoc(inspect.getmodule(cls)) or ""
    return doc.strip().split("\n")[0]


def _default(item: dataclasses.Field[Any]) -> Any:
    if item.default is not dataclasses.MISSING:
        return item.default
    return item.default_factory() if item.default_factory is not dataclasses.MISSING else None


def _type_text(tp: Any) -> str:
    return tp if isinstance(tp, str) else getattr(tp, "__name__", str(tp))


def _field_comments(config_class: type) -> dict[str, str]:
    """``# why`` comments of each dataclass field, from its class and the classes it extends."""
    import inspect

    notes: dict[str, str] = {}
    for cls in reversed(config_class.__mro__):
        if not dataclasses.is_dataclass(cls) or cls is object:
            continue
        try:
            lines = inspect.getsource(cls).splitlines()
        except (OSError, TypeError):
            continue
        above: list[str] = []
        for line in lines:
            text = line.strip()
            if text.startswith("#"):
                above.append(text.lstrip("# "))
                continue
            name = text.split(":", 1)[0].strip()
            if ":" in text and name.isidentifier():
                beside = text.split("#", 1)[1].strip() if "#" in text else ""
                notes[name] = " ".join(above + ([beside] if beside else [])) or notes.get(name, "")
            above = []
    return notes


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise PilotError("Tables as DataFrames need pandas: pip install pandas (or the project's "
                         "\"notebooks\" extra).") from None
    return pandas
