"""Checkpoints and cache files that prove their content: a flipped bit or a hand edit is refused, not scored."""
import json
from pathlib import Path

import pytest

from pilot.cli import main
from pilot.configure import build_config
from pilot.engine import CHECKPOINT_KIND, run_experiment
from pilot.statefile import load_state, save_state

from conftest import clean_error, correct_result, tiny_raw
from test_hostile import checkpoint_of_first_task, edit_header
from test_reliability import cli, expect_clear_error


def flip_a_data_byte(path: Path) -> None:
    """Flip the lowest bit of a byte amid the tensors' data (past the header): the size stays, the header parses."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[(start + len(data)) // 2] ^= 1
    path.write_bytes(bytes(data))


def expect_evaluate_refuses(capsys, path: Path, *needles: str) -> None:
    assert main(["evaluate", str(path.parent)]) == 2
    err = capsys.readouterr().err
    assert all(needle in err for needle in (*needles, "--restart")), err
    assert not (path.parent / "evaluation.json").exists()


@clean_error
def test_a_flipped_bit_in_a_tensor_is_refused_by_resume_and_evaluate(tmp_path, capsys, monkeypatch):
    raw, path = checkpoint_of_first_task(tmp_path, monkeypatch)
    flip_a_data_byte(path)
    damaged = f"'{path}' was damaged or edited after pilot wrote it"
    expect_clear_error(tmp_path, capsys, raw, damaged, "--restart", args=("--resume",))
    expect_evaluate_refuses(capsys, path, damaged)


@clean_error
def test_an_edited_count_is_refused(tmp_path, capsys, monkeypatch):
    raw, path = checkpoint_of_first_task(tmp_path, monkeypatch)
    correct = load_state(path, CHECKPOINT_KIND)["metrics"]["correct"][0][0]
    edit_header(path, f'"correct": [[{correct}]]', f'"correct": [[{correct - 1}]]')
    expect_clear_error(tmp_path, capsys, raw, "was damaged or edited", "--restart", args=("--resume",))


@clean_error
def test_an_edited_backbone_is_refused_by_evaluate(tmp_path, capsys, monkeypatch):
    _, path = checkpoint_of_first_task(tmp_path, monkeypatch)
    edit_header(path, '"depth": 2', '"depth": 1')  # a smaller model, which the learner's state would still fit
    expect_evaluate_refuses(capsys, path, "was damaged or edited")


def rewrite(path: Path, edit) -> None:
    """Edit a checkpoint's state and save it with a new digest: what a bug, or a careful forger, could write."""
    state = load_state(path, CHECKPOINT_KIND)
    edit(state)
    save_state(path, state, CHECKPOINT_KIND)


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s["metrics"]["correct"][0].__setitem__(0, s["metrics"]["total"][0][0] + 1),
     "its metrics at step 1: task 1's correct count 17 exceeds its 16 test images"),
    (lambda s: s["task_metrics"]["correct"][0].__setitem__(0, -1),
     "its task_metrics at step 1: task 1's counts -1 of 16 are not whole numbers of images"),
    (lambda s: [s["metrics"][k][0].append(0) for k in ("correct", "total")],
     "its metrics at step 1 do not hold one count per task learnt by then"),
    (lambda s: s["rows"].append(s["rows"][0]), "it says it completed 1 tasks but holds 2 rows of results"),
], ids=["correct above total", "negative", "counts of a task not yet learnt", "a row too many"])
@clean_error
def test_impossible_counts_under_a_valid_digest_are_refused_naming_them(tmp_path, capsys, monkeypatch, edit, needle):
    raw, path = checkpoint_of_first_task(tmp_path, monkeypatch)
    rewrite(path, edit)
    expect_clear_error(tmp_path, capsys, raw, f"'{path}' was damaged or edited: {needle}.", "--restart",
                       args=("--resume",))
    expect_evaluate_refuses(capsys, path, needle)


def test_a_consistent_checkpoint_resumes_and_evaluates_as_before(tmp_path, capsys, monkeypatch):
    raw, path = checkpoint_of_first_task(tmp_path, monkeypatch)
    assert cli(tmp_path, raw, "--resume") == 0
    assert main(["evaluate", str(path.parent)]) == 0
    evaluation = json.loads((path.parent / "evaluation.json").read_text())
    assert evaluation["completed_tasks"] == 4 and evaluation["accuracy"] == evaluation["recorded_accuracy"]


@correct_result
def test_a_cache_file_with_a_flipped_bit_warns_and_is_computed_again(tmp_path):
    cache = tmp_path / "cache"
    (first,) = run_experiment(build_config(tiny_raw(tmp_path, feature_cache_dir=str(cache), prefix="a")))
    files = sorted(cache.glob("**/*.safetensors"))
    assert files
    for path in files:
        flip_a_data_byte(path)
    with pytest.warns(UserWarning, match="feature cache: .* was damaged or edited after pilot wrote it") as warned:
        (second,) = run_experiment(build_config(tiny_raw(tmp_path, feature_cache_dir=str(cache), prefix="b")))
    assert len([w for w in warned if "damaged or edited" in str(w.message)]) == len(files)
    assert second["counts"] == first["counts"]
    assert second["timings"]["encoded_images"] == first["timings"]["encoded_images"]
    for path in files:  # replaced by intact files
        load_state(path, "pilot-features/1")
