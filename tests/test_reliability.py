"""Nothing silent, nothing lost, nothing executed: bad data, damaged files, crafted files, locks,
failed writes, non-finite values, failed-run records and ``pilot evaluate`` (tiny ViT, small folders)."""
import errno
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pilot import engine
from pilot.cli import main
from pilot.configure import build_config
from pilot.engine import CHECKPOINT, CHECKPOINT_KIND, Run, run_experiment
from pilot.errors import PilotError
from pilot.evaluation import evaluate_run
from pilot.runlock import LOCK_NAME, RunLocked, run_lock
from pilot.statefile import load_state

from conftest import clean_error, correct_result, tiny_raw

CLASSES = ("ant", "bee", "cat", "dog")  # seed 1's order: dog, cat (task 1), ant (task 2), bee (task 3)


def write_folder(root: Path, classes=CLASSES, train=4, test=2, parts=("train", "test")) -> Path:
    """An image-folder dataset: each class a colour, each image that colour plus noise (JPEG files)."""
    rng = np.random.RandomState(0)
    for part in parts:
        for index, name in enumerate(classes):
            (root / part / name).mkdir(parents=True)
            for i in range(train if part == "train" else test):
                colour = np.array([60 * index, 255 - 60 * index, 40 * (index % 2)], dtype=float)
                pixels = np.clip(colour + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / part / name / f"{i}.jpg")
    return root


def folder_raw(tmp_path, root, **overrides):
    return tiny_raw(tmp_path, dataset="folder", data_path=str(root), init_cls=2, increment=1, **overrides)


def cli(tmp_path, raw, *args):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return main(["--config", str(path), *args])


def run_dir_of(raw) -> Path:
    config = build_config(raw)
    return engine.run_directory(config.experiment, config.experiment.seed[0])


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def truncate_pixels(jpeg: Path) -> None:
    """Cut a JPEG inside its compressed pixels: the header still reads, decoding fails."""
    data = jpeg.read_bytes()
    scan = data.index(b"\xff\xda")
    jpeg.write_bytes(data[: (scan + len(data)) // 2])


class MakesAFile:
    """A pickle payload that creates ``target`` when unpickled: loading it must never run."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return Path.touch, (self.target,)


# --- data checks, before anything is written ------------------------------------------------------


def expect_clear_error(tmp_path, capsys, raw, *needles, args=()):
    assert cli(tmp_path, raw, *args) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("pilot: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@clean_error
def test_a_class_without_images_is_named_and_nothing_is_written(tmp_path, capsys):
    root = write_folder(tmp_path / "data")
    for part in ("train", "test"):
        for image in (root / part / "cat").iterdir():
            image.unlink()
    expect_clear_error(tmp_path, capsys, folder_raw(tmp_path, root), "Class 'cat' has no train images",
                       "add images to its train folder")
    assert not (tmp_path / "logs").exists()


@clean_error
def test_per_class_limits_are_applied_before_the_check(tmp_path, capsys):
    root = write_folder(tmp_path / "data")
    for image in (root / "test" / "dog").iterdir():
        image.unlink()
    expect_clear_error(tmp_path, capsys, folder_raw(tmp_path, root, test_per_class=1),
                       "Class 'dog' has no test images after test_per_class")


@clean_error
def test_a_test_class_that_train_lacks_is_named(tmp_path, capsys):
    root = write_folder(tmp_path / "data")
    write_folder(tmp_path / "extra", classes=("emu",), parts=("test",))
    shutil.move(tmp_path / "extra" / "test" / "emu", root / "test" / "emu")
    expect_clear_error(tmp_path, capsys, folder_raw(tmp_path, root), "has class folders that", "'emu'")
    assert not (tmp_path / "logs").exists()


@clean_error
def test_an_unreadable_image_is_named_by_path_before_anything_is_written(tmp_path, capsys):
    root = write_folder(tmp_path / "data")
    bad = root / "train" / "bee" / "1.jpg"
    bad.write_bytes(b"this is no image")
    expect_clear_error(tmp_path, capsys, folder_raw(tmp_path, root), f"'{bad}'", "cannot be read")
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("workers", [0, 1])
@clean_error
def test_a_decode_failure_in_a_loader_is_the_same_clear_error_and_leaves_a_failed_record(tmp_path, capsys, workers):
    root = write_folder(tmp_path / "data")
    bad = root / "train" / "ant" / "0.jpg"  # task 2's class: task 1 completes first
    truncate_pixels(bad)
    raw = folder_raw(tmp_path, root, num_workers=workers)
    expect_clear_error(tmp_path, capsys, raw, f"Image file '{bad}' cannot be decoded")
    record = json.loads((run_dir_of(raw) / "results.json").read_text())
    assert record["status"] == "failed" and record["completed_tasks"] == 1
    assert record["error"]["type"] == "UnreadableImage" and record["error"]["task"] == 2
    assert record["error"]["user_fault"] and "traceback" not in record["error"]


@correct_result
def test_a_failed_run_resumes_after_the_fix_to_the_uninterrupted_result(tmp_path, capsys):
    root = write_folder(tmp_path / "data")
    (uninterrupted,) = run_experiment(build_config(folder_raw(tmp_path / "clean", root)))
    bad = root / "train" / "bee" / "2.jpg"  # task 3's class
    intact = bad.read_bytes()
    truncate_pixels(bad)
    raw = folder_raw(tmp_path, root)
    expect_clear_error(tmp_path, capsys, raw, "cannot be decoded")
    run_dir = run_dir_of(raw)
    assert load_state(run_dir / CHECKPOINT, CHECKPOINT_KIND)["completed_tasks"] == 2
    bad.write_bytes(intact)
    assert cli(tmp_path, raw, "--resume") == 0
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "complete" and "error" not in record
    assert record["counts"] == uninterrupted["counts"]


@clean_error
def test_cifar_pickles_that_would_run_code_are_refused(tmp_path):
    from pilot.data.datasets import load_cifar100

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    target = tmp_path / "created"
    for member in ("train", "test", "meta"):
        (folder / member).write_bytes(pickle.dumps(MakesAFile(target)))
    with pytest.raises(PilotError, match="pathlib"):
        load_cifar100(str(tmp_path), download=False, name="cifar224")
    assert not target.exists()


# --- non-finite values ------------------------------------------------------------------------------


@clean_error
def test_a_nan_loss_stops_the_run_naming_learner_task_epoch_and_step(tmp_path, capsys, monkeypatch):
    from pilot.learners.l2p import L2P

    outputs = L2P.train_outputs
    calls = {"task 2": 0}

    def poisoned(self, images, labels, task):
        logits, extra = outputs(self, images, labels, task)
        if task.index == 1:
            calls["task 2"] += 1
            if calls["task 2"] == 2:
                return logits, extra + float("nan")
        return logits, extra

    monkeypatch.setattr(L2P, "train_outputs", poisoned)
    raw = tiny_raw(tmp_path, model_name="l2p", tuned_epoch=1, batch_size=4)
    err = expect_clear_error(tmp_path, capsys, raw, "l2p: task 2, epoch 1, step 2: the loss became non-finite")
    assert "init_lr" in err
    record = json.loads((run_dir_of(raw) / "results.json").read_text())
    assert record["status"] == "failed" and record["error"]["type"] == "NonFiniteValues"
    assert load_state(run_dir_of(raw) / CHECKPOINT, CHECKPOINT_KIND)["completed_tasks"] == 1


@clean_error
def test_non_finite_test_logits_stop_the_run(tmp_path, capsys, monkeypatch):
    from pilot.learners.simplecil import SimpleCIL

    predict = SimpleCIL.predict
    monkeypatch.setattr(SimpleCIL, "predict", lambda self, split: predict(self, split) * float("nan"))
    expect_clear_error(tmp_path, capsys, tiny_raw(tmp_path),
                       "simplecil: evaluation after task 1: the test logits became non-finite")


# --- checkpoints and the feature cache ---------------------------------------------------------------


@clean_error
def test_a_truncated_checkpoint_is_a_clear_error_with_the_choice_to_start_over(tmp_path, capsys, monkeypatch):
    raw = tiny_raw(tmp_path)
    (uninterrupted,) = run_experiment(build_config(tiny_raw(tmp_path / "clean")))
    interrupt_before_task(monkeypatch, raw, 2)
    path = run_dir_of(raw) / CHECKPOINT
    truncate(path)
    expect_clear_error(tmp_path, capsys, raw, f"'{path}' cannot be read", "--restart", args=("--resume",))
    assert cli(tmp_path, raw, "--restart") == 0
    record = json.loads((run_dir_of(raw) / "results.json").read_text())
    assert record["status"] == "complete" and record["counts"] == uninterrupted["counts"]


def interrupt_before_task(monkeypatch, raw, index):
    from conftest import Killed, die_at_task

    with monkeypatch.context() as patch:
        patch.setattr(Run, "_step", die_at_task(index))
        with pytest.raises(Killed):
            run_experiment(build_config(raw))


@pytest.mark.parametrize("name", [CHECKPOINT, engine.LEGACY_CHECKPOINT])
@clean_error
def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path, capsys, monkeypatch, name):
    raw = tiny_raw(tmp_path)
    interrupt_before_task(monkeypatch, raw, 1)
    run_dir = run_dir_of(raw)
    (run_dir / CHECKPOINT).unlink()
    target = tmp_path / "created-by-the-checkpoint"
    torch.save({"learner": MakesAFile(target)}, run_dir / name)  # a zip of pickles, as torch.save writes
    err = expect_clear_error(tmp_path, capsys, raw, str(run_dir / name), args=("--resume",))
    assert ("earlier pilot version" in err) if name == engine.LEGACY_CHECKPOINT else ("not a pilot state file" in err)
    assert not target.exists()


@correct_result
def test_a_truncated_feature_cache_is_recomputed_and_replaced_with_a_warning(tmp_path, capsys):
    cache = tmp_path / "cache"
    (first,) = run_experiment(build_config(tiny_raw(tmp_path, feature_cache_dir=str(cache), prefix="a")))
    files = sorted(cache.glob("features-*.safetensors"))
    assert len(files) == 2  # train and test
    truncate(files[0])
    target = tmp_path / "created-by-the-cache"
    files[1].write_bytes(pickle.dumps(MakesAFile(target)))
    with pytest.warns(UserWarning, match="feature cache: .* cannot be read") as warned:
        (second,) = run_experiment(build_config(tiny_raw(tmp_path, feature_cache_dir=str(cache), prefix="b")))
    assert len([w for w in warned if "feature cache" in str(w.message)]) == 2
    assert second["counts"] == first["counts"] and second["timings"]["encoded_images"] == first["timings"]["encoded_images"]
    assert not target.exists()
    for path in files:  # replaced by whole files that the next run reads without encoding
        assert load_state(path, "pilot-features/1")["known"].all()
    (third,) = run_experiment(build_config(tiny_raw(tmp_path, feature_cache_dir=str(cache), prefix="c")))
    assert third["timings"]["encoded_images"] == 0


@correct_result
def test_a_mismatched_feature_cache_file_is_replaced_with_a_warning(tmp_path):
    cache = tmp_path / "cache"
    run_experiment(build_config(tiny_raw(tmp_path, feature_cache_dir=str(cache))))
    run = Run(build_config(tiny_raw(tmp_path, feature_cache_dir=str(cache), prefix="b")))
    store, train = run.ctx.features, run.stream.tasks[0].train
    shutil.copy(store._cache_file("test"), store._cache_file("train"))  # rows of the other part: the wrong size
    with pytest.warns(UserWarning, match="does not hold this run's features of the train images"):
        features = store(train)
    assert store.encoded_images == len(train)
    saved = load_state(store._cache_file("train"), "pilot-features/1")
    assert saved["rows"].shape[0] == len(train.source) and torch.equal(saved["rows"][train.indices], features)


# --- locks, failed writes ---------------------------------------------------------------------------------


@clean_error
def test_a_live_lock_is_refused_and_a_stale_one_taken_over(tmp_path, capsys):
    raw = tiny_raw(tmp_path, max_tasks=1)
    run_dir = run_dir_of(raw)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom pilot.runlock import run_lock\n"
        f"with run_lock({str(run_dir)!r}):\n    print('held', flush=True)\n    time.sleep(120)\n")],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert holder.stdout.readline().strip() == "held"
        expect_clear_error(tmp_path, capsys, raw, f"is in use by pid {holder.pid} on host")
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]  # nothing written beside the lock
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == holder.pid  # left behind by the kill
    with pytest.warns(UserWarning, match=f"locked by pid {holder.pid} .* no longer running"):
        (result,) = run_experiment(build_config(raw))
    assert result["status"] == "complete" and not (run_dir / LOCK_NAME).exists()


@clean_error
def test_the_lock_is_exclusive_within_a_process_too(tmp_path):
    with run_lock(tmp_path / "run"):
        with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
            with run_lock(tmp_path / "run"):
                pass
    with run_lock(tmp_path / "run"):  # released: free again
        pass


@clean_error
def test_disk_full_during_the_results_write_keeps_the_previous_files(tmp_path, capsys, monkeypatch):
    import pilot.outputs

    raw = tiny_raw(tmp_path)
    (uninterrupted,) = run_experiment(build_config(tiny_raw(tmp_path / "clean")))
    mkstemp, fsync, results_writes = pilot.outputs.tempfile.mkstemp, os.fsync, []

    def counting(*args, prefix, **kwargs):  # the disk fills up as task 2's results.json is written
        results_writes.extend([prefix] if prefix.startswith(".results.json.") else [])
        return mkstemp(*args, prefix=prefix, **kwargs)

    def full_disk(fd):
        if len(results_writes) >= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(pilot.outputs.tempfile, "mkstemp", counting)
    monkeypatch.setattr(pilot.outputs.os, "fsync", full_disk)
    expect_clear_error(tmp_path, capsys, raw, "results.json", "No space left on device", "previous version is intact")
    monkeypatch.undo()
    run_dir = run_dir_of(raw)
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "running" and record["completed_tasks"] == 1
    assert load_state(run_dir / CHECKPOINT, CHECKPOINT_KIND)["completed_tasks"] == 2
    assert not list(run_dir.glob(".*.tmp"))
    assert cli(tmp_path, raw, "--resume") == 0
    assert json.loads((run_dir / "results.json").read_text())["counts"] == uninterrupted["counts"]


@clean_error
def test_permission_denied_is_a_clear_error(tmp_path, monkeypatch):
    import pilot.outputs

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(pilot.outputs.tempfile, "mkstemp", denied)
    with pytest.raises(pilot.outputs.WriteFailed, match="Permission denied"):
        pilot.outputs.atomic_write_text(tmp_path / "results.json", "{}")


def test_a_bug_is_reported_with_its_traceback_and_recorded(tmp_path, capsys, monkeypatch):
    from pilot.learners.simplecil import SimpleCIL

    def broken(self, task):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(SimpleCIL, "fit", broken)
    raw = tiny_raw(tmp_path)
    assert cli(tmp_path, raw) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: a bug" in err and "internal error" in err
    record = json.loads((run_dir_of(raw) / "results.json").read_text())
    assert record["status"] == "failed" and not record["error"]["user_fault"]
    assert "ZeroDivisionError" in record["error"]["traceback"]


# --- kill -9 at any moment ----------------------------------------------------------------------------

# Each point, and which time it is reached (drawn once, seeded): encodings 1-8 (train and test of 4
# tasks), steps 1-16 (2 epochs of 2 batches a task), predictions 1-10 (every seen task's test split
# after each task), checkpoints 1-4, results.json writes 1-4 (one per task).
KILLS = {point: random.Random(point).randint(low, high)
         for point, low, high in (("encoding", 2, 8), ("training", 2, 16), ("evaluation", 2, 10),
                                  ("checkpoint", 1, 4), ("results", 1, 4))}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    (result,) = run_experiment(build_config(killable_raw(folder)))
    return result


def killable_raw(folder: Path) -> dict:
    return tiny_raw(folder, model_name="linear_probe", tuned_epoch=2, batch_size=4, synthetic_per_class=4,
                    feature_cache_dir=str(folder / "cache"))


@pytest.mark.slow
@pytest.mark.parametrize("point", KILLS)
@correct_result
def test_kill_9_then_resume_ends_as_an_uninterrupted_run_with_no_file_truncated(tmp_path, point, uninterrupted):
    raw = killable_raw(tmp_path)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(raw))
    worker = Path(__file__).parent / "_killed_run.py"
    killed = subprocess.run([sys.executable, str(worker), str(config_path), point, str(KILLS[point])],
                            capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = run_dir_of(raw)
    if point in ("checkpoint", "results"):  # cut off mid-file: the half is in a temporary file, never read
        assert list(run_dir.glob(".*.tmp"))
    if (run_dir / "results.json").exists():  # whatever a kill leaves is whole
        assert json.loads((run_dir / "results.json").read_text())["status"] == "running"
    if (run_dir / CHECKPOINT).exists():
        load_state(run_dir / CHECKPOINT, CHECKPOINT_KIND)
    for path in (tmp_path / "cache").glob("*.safetensors"):
        load_state(path, "pilot-features/1")

    (resumed,) = run_experiment(build_config(raw), resume=True)
    assert resumed["counts"] == uninterrupted["counts"]
    assert resumed["accuracy_curve"] == uninterrupted["accuracy_curve"]
    assert not list(tmp_path.rglob("*.tmp")) and not (run_dir / LOCK_NAME).exists()
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["status"] == "complete" and saved["counts"] == uninterrupted["counts"]


# --- pilot evaluate ---------------------------------------------------------------------------------------


def test_evaluate_reproduces_the_last_accuracy_exactly(tmp_path, capsys):
    raw = tiny_raw(tmp_path, model_name="linear_probe", tuned_epoch=2)
    (result,) = run_experiment(build_config(raw))
    run_dir = run_dir_of(raw)
    results_before = (run_dir / "results.json").read_bytes()
    assert main(["evaluate", str(run_dir)]) == 0
    out = capsys.readouterr().out
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["accuracy"] == result["last_accuracy"] == evaluation["recorded_accuracy"]
    assert evaluation["counts"] == {"correct": result["counts"]["correct"][-1], "total": result["counts"]["total"][-1]}
    assert f"accuracy {result['last_accuracy']:.2f}" in out
    assert (run_dir / "results.json").read_bytes() == results_before


@correct_result
def test_evaluate_on_a_shifted_copy_of_the_test_set(tmp_path, capsys):
    root = write_folder(tmp_path / "data")
    raw = folder_raw(tmp_path, root)
    (result,) = run_experiment(build_config(raw))
    shifted = tmp_path / "shifted"
    shutil.copytree(root / "test", shifted / "test")  # a test set alone
    for image in shifted.rglob("*.jpg"):
        Image.eval(Image.open(image), lambda v: 255 - v).save(image)  # colours inverted
    run_dir = run_dir_of(raw)
    assert main(["evaluate", str(run_dir), "--data-path", str(shifted), "--output", str(tmp_path / "e.json")]) == 0
    evaluation = json.loads((tmp_path / "e.json").read_text())
    assert evaluation["data_path"] == str(shifted) and evaluation["recorded_accuracy"] == result["last_accuracy"]
    assert sum(evaluation["counts"]["total"]) == len(CLASSES) * 2
    assert evaluation["accuracy"] < result["last_accuracy"]
    assert not (run_dir / "evaluation.json").exists()
    # other classes: refused, with what differs
    other = write_folder(tmp_path / "other", classes=("ant", "bee", "cat", "eel"), parts=("test",))
    assert main(["evaluate", str(run_dir), "--data-path", str(other)]) == 2
    assert "missing e.g. ['dog']" in capsys.readouterr().err


@clean_error
def test_evaluate_refuses_keys_that_define_the_run(tmp_path, capsys):
    raw = tiny_raw(tmp_path, max_tasks=1)
    run_experiment(build_config(raw))
    assert main(["evaluate", str(run_dir_of(raw)), "--set", "init_cls=2"]) == 2
    assert "cannot change init_cls" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nowhere")]) == 2
    assert "checkpoint.safetensors' not found" in capsys.readouterr().err


def test_evaluate_on_a_finished_run_matches_for_a_learner_with_adaptation(tmp_path):
    raw = tiny_raw(tmp_path, model_name="aper_adapter", tuned_epoch=1, batch_size=8, max_tasks=2)
    (result,) = run_experiment(build_config(raw))
    evaluation = evaluate_run(run_dir_of(raw))
    assert evaluation["accuracy"] == result["last_accuracy"]
