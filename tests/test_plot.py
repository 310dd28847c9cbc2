import subprocess
import sys
from pathlib import Path

from pilot.engine import run_experiment

PLOT = Path(__file__).resolve().parents[1] / "tools" / "plot.py"


def test_plot_writes_pngs_for_several_runs(tiny_config, tmp_path):
    results = run_experiment(tiny_config(seed=[1, 2]))
    out = tmp_path / "plots"
    done = subprocess.run([sys.executable, str(PLOT), str(tmp_path / "logs"), "--out", str(out)],
                          capture_output=True, text=True, check=True)
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == ["accuracy_curve.png", "accuracy_matrix_1_vit_tiny_patch16_224.png",
                       "accuracy_matrix_2_vit_tiny_patch16_224.png", "forgetting.png"]
    assert all((out / name).stat().st_size > 5000 for name in written)
    assert str(out / "accuracy_curve.png") in done.stdout and len(results) == 2


def test_plot_without_runs_is_an_error(tmp_path):
    done = subprocess.run([sys.executable, str(PLOT), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and "no results.json" in done.stderr


def test_summarize_tables_runs_and_seeds(tiny_config, tmp_path):
    results = run_experiment(tiny_config(seed=[1, 2], max_tasks=2))
    summarize = PLOT.with_name("summarize.py")
    done = subprocess.run([sys.executable, str(summarize), str(tmp_path / "logs")],
                          capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    assert sum(line.startswith("| simplecil |  | ") for line in lines) == 3  # two runs, one seed summary
    averages = [r["average_incremental_accuracy"] for r in results]
    assert f"{sum(averages) / 2:.2f} ±" in done.stdout
