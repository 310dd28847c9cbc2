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
    assert written == ["accuracy_curve.png", "accuracy_matrix_1_vit_tiny_patch16_224.png",
                       "accuracy_matrix_2_vit_tiny_patch16_224.png", "forgetting.png", "mean_curve.png"]
    assert all((out / name).stat().st_size > 5000 for name in written)
    assert str(out / "accuracy_curve.png") in done.stdout and len(results) == 2


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
