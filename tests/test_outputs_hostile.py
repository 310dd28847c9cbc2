"""Hostile outputs and inputs (issue 29): a feature cache path that is a file, a lock that cannot be removed,
damaged results.json under `pilot summarize`, the internal-error message, file modes, NFD class names, and
a class with one training image for a learner that needs two."""
import os
import pathlib
import unicodedata

import pytest

from pilot import engine
from pilot.cli import main
from pilot.configure import build_config
from pilot.data.names import folder_class_name
from pilot.engine import run_experiment
from pilot.evaluation import _require_same_classes
from pilot.outputs import WriteFailed, atomic_write_text
from pilot.runlock import LOCK_NAME, run_lock

from conftest import clean_error, correct_result, tiny_raw
from test_reliability import cli, expect_clear_error, folder_raw, run_dir_of, write_folder


@clean_error
def test_a_feature_cache_path_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "cache").write_text("not a folder")
    raw = tiny_raw(tmp_path, feature_cache_dir=str(tmp_path / "cache" / "features"))
    expect_clear_error(tmp_path, capsys, raw, "feature_cache_dir", f"'{tmp_path / 'cache'}' is a file")
    assert not run_dir_of(raw).exists()


@clean_error
def test_a_lock_that_cannot_be_removed_never_hides_the_runs_own_error(tmp_path, monkeypatch):
    def read_only(self, missing_ok=False):
        raise PermissionError(13, "Permission denied", str(self))

    with pytest.raises(WriteFailed, match="could not be written"):
        with run_lock(tmp_path / "run"):
            monkeypatch.setattr(pathlib.Path, "unlink", read_only)  # the folder turns read-only mid-run
            raise WriteFailed("could not be written")
    monkeypatch.undo()
    assert (tmp_path / "run" / LOCK_NAME).read_text() == ""  # emptied: the next run takes it over silently
    with run_lock(tmp_path / "run"):
        pass


@correct_result
def test_summarize_skips_damaged_results_naming_each(tmp_path, capsys):
    raw = tiny_raw(tmp_path, max_tasks=1)
    run_experiment(build_config(raw))
    logs = tmp_path / "logs"
    damaged = {"truncated": '{"status": "compl', "list": "[1, 2]", "keyless": '{"status": "complete"}'}
    for name, text in damaged.items():
        (logs / name).mkdir()
        (logs / name / "results.json").write_text(text)
    with pytest.warns(UserWarning) as caught:
        assert main(["summarize", "--runs", str(logs)]) == 0
    out, err = capsys.readouterr()
    assert "simplecil" in out and "Traceback" not in err, err
    warned = "\n".join(str(w.message) for w in caught)
    for name, why in (("truncated", "cannot be read as JSON"), ("list", "holds a JSON list"),
                      ("keyless", "lacks seed, config")):
        assert f"skipping '{logs / name / 'results.json'}': it {why}" in warned, warned


@clean_error
def test_an_internal_error_before_a_run_started_claims_no_record(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(engine, "assemble", broken)
    assert cli(tmp_path, tiny_raw(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "internal error" in err and "results.json" not in err and "--resume" not in err, err


@clean_error
def test_an_internal_error_in_a_run_names_its_record(tmp_path, capsys, monkeypatch):
    from pilot.learners.simplecil import SimpleCIL

    monkeypatch.setattr(SimpleCIL, "fit", lambda self, task: 1 / 0)
    raw = tiny_raw(tmp_path)
    assert cli(tmp_path, raw) == 1
    assert f"The run recorded it in '{run_dir_of(raw) / 'results.json'}'" in capsys.readouterr().err


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
@correct_result
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "results.json", "{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == mode


@correct_result
def test_class_names_from_macos_folders_compare_in_nfc():
    nfc, nfd = "café", unicodedata.normalize("NFD", "café")
    assert nfd != nfc and folder_class_name(nfd) == nfc
    _require_same_classes([nfd, "thé"], [nfc, unicodedata.normalize("NFD", "thé")], "folder")  # no error


@pytest.mark.parametrize("learner", ["fecam", "slca"])
@clean_error
def test_a_class_with_one_training_image_is_refused_for_a_covariance_learner(tmp_path, capsys, learner):
    root = write_folder(tmp_path / "data")
    for image in sorted((root / "train" / "cat").iterdir())[1:]:
        image.unlink()
    raw = folder_raw(tmp_path, root, model_name=learner)
    expect_clear_error(tmp_path, capsys, raw, "Class 'cat' (1 image) has fewer than 2 training images", learner)
    assert not run_dir_of(raw).exists()


@correct_result
def test_one_training_image_is_enough_for_a_learner_without_covariances(tmp_path):
    root = write_folder(tmp_path / "data")
    for image in sorted((root / "train" / "cat").iterdir())[1:]:
        image.unlink()
    (results,) = run_experiment(build_config(folder_raw(tmp_path, root, max_tasks=1)))
    assert results["status"] == "complete"


@correct_result
def test_class_folders_copied_from_macos_keep_their_order(tmp_path):
    """NFD spells 'é' as 'e' + an accent, which sorts before 'f'; NFC's 'é' sorts after: the order is NFC's."""
    from PIL import Image

    from pilot.data.datasets import load_folder
    for form in ("NFC", "NFD"):
        for part in ("train", "test"):
            for name in ("éclair", "fig"):
                folder = tmp_path / form / part / unicodedata.normalize(form, name)
                folder.mkdir(parents=True)
                Image.new("RGB", (8, 8)).save(folder / "0.png")
    names = [load_folder(str(tmp_path / form), "folder").class_names for form in ("NFC", "NFD")]
    assert names[0] == names[1] == ["fig", "éclair"]
