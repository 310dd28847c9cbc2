"""pilot as a library: pilot.run on a dict is `python main.py` on its file; load, ResultSet, config_for."""
import json

import numpy as np
import pytest

import pilot
from pilot.cli import main
from pilot.summary import load_runs, summarize

from conftest import tiny_raw

METRICS = ("accuracy_curve", "accuracy_matrix", "average_incremental_accuracy", "last_accuracy", "forgetting",
           "per_class_accuracy", "class_order")


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api")
    seen = []
    results = pilot.run(tiny_raw(folder), seeds=[1, 2], progress=False, on_task_end=seen.append)
    return folder, results, seen


def test_run_on_a_dict_records_what_main_py_records_on_its_file(tmp_path, two_seeds):
    folder, results, _ = two_seeds
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_raw(tmp_path, seed=[1])))
    assert main(["--config", str(config), "--quiet"]) == 0
    (from_file,) = load_runs([str(tmp_path / "logs")])[1]
    ours = json.loads((results[0].run_dir / "results.json").read_text())
    assert {k: ours[k] for k in METRICS} == {k: from_file[k] for k in METRICS}
    assert results[0].record == ours


def test_a_run_result_reads_its_record_and_loads_back(two_seeds):
    _, results, _ = two_seeds
    first = results[0]
    assert isinstance(results, pilot.ResultSet) and len(results) == 2 and first.seed == 1
    assert first.curve == first.record["accuracy_curve"] and len(first.curve) == 4
    assert first.average == pytest.approx(np.mean(first.curve)) and first.last == first.curve[-1]
    assert first.matrix.shape == (4, 4) and np.isnan(first.matrix[0, 1])
    assert [row.task for row in first.per_task] == [1, 2, 3, 4]
    assert first.per_task[-1].accuracy == first.last and "per_class_accuracy" in first.per_task[-1].extra
    assert pilot.load(first.run_dir) == first
    frame = first.to_frame()
    assert list(frame["task"]) == [1, 2, 3, 4] and list(frame["accuracy"]) == first.curve


def test_on_task_end_sees_each_task_as_it_is_written(two_seeds):
    _, results, seen = two_seeds
    assert [len(result.curve) for result in seen] == [1, 2, 3, 4] * 2
    assert seen[3].record == results[0].record and seen[-1].record == results[1].record


def test_a_result_set_gives_what_pilot_summarize_gives(two_seeds):
    folder, results, _ = two_seeds
    (row,) = summarize(load_runs([str(folder / "logs")])[1])
    assert results.average == row["average_incremental_accuracy"]
    assert results.last == row["last_accuracy"] and results.forgetting == row["forgetting"]
    mean, std = results.curve
    np.testing.assert_allclose(mean, np.mean([run.curve for run in results], axis=0))
    assert std.shape == (4,)
    (table,) = pilot.summarize(folder / "logs").to_dict("records")
    assert table["average_incremental_accuracy"] == row["average_incremental_accuracy"]
    assert len(results.to_frame()) == 8


def test_a_bad_config_raises_pilot_error_naming_the_key(tmp_path):
    with pytest.raises(pilot.PilotError, match="init_cls"):
        pilot.run(tiny_raw(tmp_path, init_cls=-1))
    with pytest.raises(pilot.PilotError, match="does not exist"):
        pilot.run(tmp_path / "missing.json")
    with pytest.raises(pilot.PilotError, match="no results.json"):
        pilot.load(tmp_path)


def test_config_for_lists_every_field_with_its_default_and_why():
    l2p = {item["key"]: item for item in pilot.config_for("l2p")}
    assert l2p["batch_size"]["default"] == 16 and l2p["top_k"]["default"] == 5
    assert "[CLS]" in l2p["prompt_position"]["description"] and l2p["prompt_position"]["default"] == "none"
    from pilot.learners import learner_class
    import dataclasses

    for name in ("l2p", "ranpac"):
        fields = [item.name for item in dataclasses.fields(learner_class(name).config_class)]
        assert [item["key"] for item in pilot.config_for(name)] == fields
    learners = pilot.list_learners()
    assert {"simplecil", "l2p", "replay"} <= set(learners) and all(learners.values())


def test_plot_returns_a_figure_of_each_kind(two_seeds):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, results, _ = two_seeds
    for kind in ("curve", "matrix", "forgetting"):
        figure = results[0].plot(kind)
        assert isinstance(figure, matplotlib.figure.Figure) and figure.axes
    fig, ax = plt.subplots()
    assert results[0].plot("curve", ax=ax) is fig and results[1].plot("curve", ax=ax) is fig
    first, second = ax.get_lines()
    assert first.get_color() != second.get_color()  # two runs on one axes keep apart
    assert list(first.get_ydata()) == results[0].curve
    band = results.plot()
    assert band.axes[0].collections  # the ±std band
    assert results.plot("forgetting").axes[0].patches
    with pytest.raises(pilot.PilotError, match="plot kind"):
        results[0].plot("pie")
    plt.close("all")


def test_an_interrupted_run_is_recorded_and_resumes_to_the_uninterrupted_result(tmp_path, two_seeds, monkeypatch):
    from pilot.learners.simplecil import SimpleCIL

    fit = SimpleCIL.fit

    def interrupted_at_task_3(self, task):
        if task.index == 2:
            raise KeyboardInterrupt  # what Ctrl-C, or a notebook kernel's interrupt, raises
        fit(self, task)

    monkeypatch.setattr(SimpleCIL, "fit", interrupted_at_task_3)
    with pytest.raises(KeyboardInterrupt):
        pilot.run(tiny_raw(tmp_path), progress=False)
    (run_dir,) = [path.parent for path in (tmp_path / "logs").rglob("results.json")]
    assert pilot.load(run_dir).status == "interrupted" and len(pilot.load(run_dir).curve) == 2
    monkeypatch.setattr(SimpleCIL, "fit", fit)
    resumed = pilot.run(tiny_raw(tmp_path), progress=False, resume=True)
    assert resumed.status == "complete" and resumed.curve == two_seeds[1][0].curve
