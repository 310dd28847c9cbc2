"""Cases no one tried before: SIGTERM mid-training, a CIFAR pickle that names os.system, a checkpoint
cut short or whose header was edited by hand, an output folder that cannot be written, an increment
that leaves a smaller last task, and ``pilot evaluate`` on a folder of other classes."""
import json
import os
import pickle
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from pilot import engine
from pilot.cli import main
from pilot.configure import build_config
from pilot.data.datasets import make_synthetic
from pilot.data.stream import TaskStream, task_sizes
from pilot.engine import CHECKPOINT, run_experiment
from pilot.errors import PilotError
from pilot.runlock import LOCK_NAME, run_lock

from conftest import clean_error, correct_result, tiny_raw
from test_reliability import cli, expect_clear_error, folder_raw, interrupt_before_task, run_dir_of, write_folder

REPO = Path(__file__).resolve().parents[1]


# --- SIGTERM ----------------------------------------------------------------------------------------------

# A real `pilot` process that stops before its STEP-th training step and says so; the test then sends SIGTERM.
PAUSING_RUN = """
import sys, time
from pilot import cli
from pilot.learners import _gradient

descend, steps = _gradient.descend, []

def paused(*args, **kwargs):
    steps.append(None)
    if len(steps) == {step}:
        print("training", flush=True)
        time.sleep(120)
    return descend(*args, **kwargs)

_gradient.descend = paused
sys.exit(cli.main(["--config", {config!r}]))
"""


def probe_raw(folder: Path) -> dict:
    return tiny_raw(folder, model_name="linear_probe", tuned_epoch=2, batch_size=4, synthetic_per_class=4)


@pytest.mark.slow
@correct_result
def test_sigterm_during_training_records_an_interruption_frees_the_lock_and_resumes(tmp_path):
    (uninterrupted,) = run_experiment(build_config(probe_raw(tmp_path / "full")))
    raw = probe_raw(tmp_path)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(raw))
    child = subprocess.Popen([sys.executable, "-c", PAUSING_RUN.format(step=10, config=str(config))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert child.stdout.readline().strip() == "training", child.stderr.read()
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 143, err
    assert err.splitlines()[-1] == "pilot: interrupted; continue with --resume" and "Traceback" not in err, err
    run_dir = run_dir_of(raw)
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "interrupted" and 1 <= record["completed_tasks"] < 4
    assert record["error"]["type"] == "Terminated" and record["error"]["message"] == "SIGTERM"
    assert record["error"]["task"] == record["completed_tasks"] + 1 and "traceback" not in record["error"]
    assert not (run_dir / LOCK_NAME).exists()
    with run_lock(run_dir):  # free: a second run can start
        pass
    handler = signal.getsignal(signal.SIGTERM)
    assert cli(tmp_path, raw, "--resume") == 0
    assert signal.getsignal(signal.SIGTERM) is handler  # main put back the handler it found
    resumed = json.loads((run_dir / "results.json").read_text())
    assert resumed["status"] == "complete" and "error" not in resumed
    assert resumed["counts"] == uninterrupted["counts"]
    assert resumed["accuracy_curve"] == uninterrupted["accuracy_curve"]


# --- a CIFAR pickle that names code -------------------------------------------------------------------------


class RunsACommand:
    """Unpickled, it would run ``command`` through os.system."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@clean_error
def test_a_cifar_pickle_naming_os_system_is_refused_as_code_not_as_a_corrupt_file(tmp_path):
    from pilot.data.datasets import load_cifar100

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    marker = tmp_path / "ran"
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    (folder / "train").write_bytes(pickle.dumps({"data": RunsACommand(f"touch {marker}"), "fine_labels": [0]}))
    with pytest.raises(PilotError) as refused:
        load_cifar100(str(tmp_path), download=False, name="cifar224")
    message = str(refused.value)
    assert f"'{folder / 'train'}' refers to {os.system.__module__}.system" in message
    assert "refuses to load code from a data file" in message and "corrupt" not in message
    assert not marker.exists()


# --- checkpoints cut short or edited by hand ---------------------------------------------------------------


def checkpoint_of_first_task(tmp_path, monkeypatch) -> tuple[dict, Path]:
    raw = tiny_raw(tmp_path)
    interrupt_before_task(monkeypatch, raw, 1)
    return raw, run_dir_of(raw) / CHECKPOINT


@pytest.mark.parametrize("keep", [5, 40, -100], ids=["in the header's length", "in the header", "in the tensors"])
@clean_error
def test_a_truncated_checkpoint_is_a_clear_error_offering_restart(tmp_path, capsys, monkeypatch, keep):
    raw, path = checkpoint_of_first_task(tmp_path, monkeypatch)
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    expect_clear_error(tmp_path, capsys, raw, f"'{path}' cannot be read", "--restart", args=("--resume",))


def edit_header(path: Path, old: str, new: str) -> None:
    """Replace ``old`` by ``new`` (as long) in the JSON tree that the safetensors header holds as a string:
    the header still parses, the tree differs."""
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[:8], "little")
    header = data[8:8 + size].decode()
    escaped_old, escaped_new = (json.dumps(text)[1:-1] for text in (old, new))
    assert len(new) == len(old) and escaped_old in header
    edited = header.replace(escaped_old, escaped_new)
    json.loads(json.loads(edited)["__metadata__"]["tree"])
    data[8:8 + size] = edited.encode()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("old, new", [
    ('"completed_tasks": 1', '"completed_tasks": 3'),
    ('"completed_tasks": 1', '"completed_tasks": 9'),
    ('"init_cls": 4', '"init_cls": 6'),
    ('"learner": ', '"learnex": '),
], ids=["completed 3 of 4", "completed 9 of 4", "config", "learner state"])
@clean_error
def test_a_hand_edited_checkpoint_header_is_a_clear_error_offering_restart(tmp_path, capsys, monkeypatch, old, new):
    raw, path = checkpoint_of_first_task(tmp_path, monkeypatch)
    edit_header(path, old, new)
    needles = (f"'{path}' was damaged or edited", "--restart")  # the file's digest no longer matches
    expect_clear_error(tmp_path, capsys, raw, *needles, args=("--resume",))
    assert main(["evaluate", str(path.parent)]) == 2  # pilot evaluate reads the same checkpoint: the same error
    err = capsys.readouterr().err
    assert all(needle in err for needle in needles), err
    assert cli(tmp_path, raw, "--restart") == 0


# --- an output folder that cannot be written -----------------------------------------------------------------


def read_only_folder(tmp_path) -> Path:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        pytest.skip("running as root, whom a read-only mode does not stop: the case of a folder under a file covers it")
    return folder / "logs"


def under_a_file(tmp_path) -> Path:
    (tmp_path / "a-file").write_text("not a folder")
    return tmp_path / "a-file" / "logs"


@pytest.mark.parametrize("log_dir, why", [(read_only_folder, "cannot be written (permission denied)"),
                                          (under_a_file, "is a file, not a folder")], ids=["read-only", "under a file"])
@clean_error
def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, monkeypatch, log_dir,
                                                                            why):
    logs = log_dir(tmp_path)
    monkeypatch.setattr(engine, "Run", lambda *args, **kwargs: pytest.fail("a run was built"))
    try:
        expect_clear_error(tmp_path, capsys, tiny_raw(tmp_path, log_dir=str(logs)), f"'{logs.parent}' {why}",
                           "Set log_dir to a folder you can write to")
    finally:
        logs.parent.chmod(0o755)
    assert not logs.exists()


# --- an increment larger than the classes left -------------------------------------------------------------


@correct_result
def test_an_increment_that_leaves_a_smaller_last_task_warns_once_naming_the_sizes():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stream = TaskStream(make_synthetic(100, 1, 8), init_cls=10, increment=40, shuffle=True, seed=1)
        assert task_sizes(100, 10, 30) == [10, 30, 30, 30] and task_sizes(100, 100, 40) == [100]  # no warning
    assert stream.sizes == [10, 40, 40, 10]
    assert [str(w.message) for w in caught] == [
        "increment 40 does not divide the 90 classes after init_cls 10: the tasks hold 10, 40, 40, 10 classes, the "
        "last only 10. Set increment to a divisor of 90 for tasks of equal size."]


# --- pilot evaluate on other classes ----------------------------------------------------------------------------


@clean_error
def test_evaluate_on_a_folder_of_other_class_names_is_refused_naming_them(tmp_path, capsys):
    root = write_folder(tmp_path / "data")
    raw = folder_raw(tmp_path, root, max_tasks=1)
    run_experiment(build_config(raw))
    renamed = write_folder(tmp_path / "renamed", classes=("ant", "bee", "cat", "wolf"), parts=("test",))
    run_dir = run_dir_of(raw)
    assert main(["evaluate", str(run_dir), "--data-path", str(renamed)]) == 2
    err = capsys.readouterr().err
    assert "missing e.g. ['dog'], not in the run e.g. ['wolf']" in err and "Traceback" not in err, err
    assert not (run_dir / "evaluation.json").exists()
