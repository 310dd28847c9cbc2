import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np

from pilot.cli import main
from pilot.engine import run_experiment

PLOT = Path(__file__).resolve().parents[1] / "tools" / "plot.py"


def test_plot_writes_pngs_for_several_runs(tiny_config, tmp_path):
    results = run_experiment(tiny_config(seed=[1, 2]))
    out = tmp_path / "plots"
    done = subprocess.run([sys.executable, str(PLOT), str(tmp_path / "logs"), "--out", str(out)],
                          capture_output=True, text=True, check=True)
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == ["accuracy_curve.png", "accuracy_matrix_simplecil_1_vit_tiny_patch16_224.png",
                       "accuracy_matrix_simplecil_2_vit_tiny_patch16_224.png", "forgetting.png", "mean_curve.png"]
    assert all((out / name).stat().st_size > 5000 for name in written)
    assert str(out / "accuracy_curve.png") in done.stdout and len(results) == 2


def plot_tool():
    """tools/plot.py as a module, its figures kept open (``figures``) instead of closed once saved."""
    spec = importlib.util.spec_from_file_location("plot_tool", PLOT)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.figures = {}
    tool.save = lambda fig, path: tool.figures.setdefault(Path(path).name, fig) and path
    return tool


def test_matrix_files_of_two_learners_with_one_prefix_never_collide(tiny_config, tmp_path):
    run_experiment(tiny_config(max_tasks=2))
    run_experiment(tiny_config(model_name="linear_probe", tuned_epoch=1, max_tasks=2))
    tool = plot_tool()
    for learner in ("simplecil", "linear_probe"):  # plotted one at a time into one folder
        assert tool.main([str(tmp_path / "logs" / learner), "--out", str(tmp_path / "plots")]) == 0
    assert sorted(name for name in tool.figures if name.startswith("accuracy_matrix_")) == [
        "accuracy_matrix_linear_probe_1_vit_tiny_patch16_224.png", "accuracy_matrix_simplecil_1_vit_tiny_patch16_224.png"]


def test_a_run_keeps_its_colour_tasks_count_from_1_and_zero_forgetting_shows(tiny_config, tmp_path):
    run_experiment(tiny_config(seed=[1, 2], max_tasks=3))
    run_experiment(tiny_config(model_name="linear_probe", tuned_epoch=1, max_tasks=3))
    tool = plot_tool()
    assert tool.main([str(tmp_path / "logs"), "--out", str(tmp_path / "plots")]) == 0
    colours = {}  # legend label's run -> colour, in every figure drawn per run
    for name in ("accuracy_curve.png", "forgetting.png"):
        axes = tool.figures[name].axes
        for handle, text in zip(*axes[0].get_legend_handles_labels()):
            run = text.split(" (")[0]
            colour = tuple(handle.get_color() if hasattr(handle, "get_color") else handle.patches[0].get_facecolor())
            assert colours.setdefault(run, colour[:3]) == colour[:3], (name, run)
    assert len(colours) == 3
    matrix = tool.figures["accuracy_matrix_simplecil_1_vit_tiny_patch16_224.png"].axes[0]
    assert [t.get_text() for t in matrix.get_xticklabels()] == ["1", "2", "3"]
    forgetting = tool.figures["forgetting.png"].axes[0]
    assert [t.get_text() for t in forgetting.get_xticklabels()] == ["1", "2"]
    _, runs = tool.load_runs([str(tmp_path / "logs")])
    zeros = sum(value == 0 for results in runs for value in results["task_forgetting"])
    marks = [segment for c in forgetting.collections for segment in c.get_segments()]
    assert zeros and len(marks) == zeros and all(segment[:, 1].tolist() == [0.0, 0.0] for segment in marks)
    legend = [t.get_text() for t in tool.figures["mean_curve.png"].axes[0].get_legend().get_texts()]
    assert any("(1 seed," in t for t in legend) and any("(2 seeds," in t for t in legend)


def test_plot_names_the_extra_to_install_without_matplotlib(tmp_path):
    code = (f"import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = ['plot.py', {str(tmp_path)!r}]; "
            f"runpy.run_path({str(PLOT)!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1 and '".[plots]"' in done.stderr and "Traceback" not in done.stderr


def test_plot_without_runs_is_an_error(tmp_path):
    done = subprocess.run([sys.executable, str(PLOT), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and "no results.json" in done.stderr


def test_summarize_tables_runs_and_seeds(tiny_config, tmp_path, capsys):
    results = run_experiment(tiny_config(seed=[1, 2], max_tasks=2))
    assert main(["summarize", str(tmp_path / "logs"), "--runs", "--csv", str(tmp_path / "s.csv"),
                 "--latex", str(tmp_path / "s.tex")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("| simplecil |  | ") for line in lines) == 2  # the two runs
    averages = [r["average_incremental_accuracy"] for r in results]
    group = next(line for line in lines if line.startswith("| simplecil | synthetic |"))
    assert f"| 2 | {np.mean(averages):.2f} ± {np.std(averages):.2f} |" in group
    assert f"{np.mean(averages)}" in (tmp_path / "s.csv").read_text()
    assert f"${np.mean(averages):.2f} \\pm {np.std(averages):.2f}$" in (tmp_path / "s.tex").read_text()


def test_summarize_without_complete_runs_is_an_error(tmp_path, capsys):
    assert main(["summarize", str(tmp_path)]) == 2
    assert "no complete run" in capsys.readouterr().err
