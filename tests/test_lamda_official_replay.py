"""tools/lamda_official_replay.py: pilot's iCaRL agrees with LAMDA-PILOT's own models/icarl.py on the same tiny
ViT, images, batches and head rows (parameters, memory, class means, predictions), and the check fails when our
distillation temperature is broken. Needs LAMDA-PILOT's mirror ($LAMDA_PILOT_MIRROR or the default path)."""
import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
_spec = importlib.util.spec_from_file_location("lamda_official_replay", ROOT / "tools" / "lamda_official_replay.py")
replay = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(replay)

MIRROR = Path(os.environ.get("LAMDA_PILOT_MIRROR", replay.MIRROR))
pytestmark = [pytest.mark.skipif(not (MIRROR / "HEAD").is_file(),
                                 reason=f"LAMDA-PILOT's mirror is absent ({MIRROR}; set LAMDA_PILOT_MIRROR)"),
              pytest.mark.skipif(importlib.util.find_spec("scipy") is None,
                                 reason="LAMDA-PILOT's models/base.py imports scipy, which pilot does not need")]


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lamda")
    source = replay.importable(MIRROR, folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # both codes run in this process alike; one thread is faster on a busy CPU
    yield
    torch.set_num_threads(threads)
    sys.path.remove(str(source))
    for name in [n for n, m in sys.modules.items() if str(getattr(m, "__file__", "")).startswith(str(source))]:
        del sys.modules[name]  # PILOT's top-level packages (models, utils, backbone) leave with it


@pytest.mark.parametrize("broken", ["", "kd_temperature"])
def test_icarl_agrees_with_pilots_own_code_and_the_check_can_fail(official, broken):
    with contextlib.redirect_stdout(sys.stderr):
        report = replay.check("icarl", broken, tasks=2)
    assert report["agree"] is (broken == ""), report
    last = report["tasks"][-1]
    assert last["newest_branch_moved_by"] > 1e-3  # trained weights were compared
    if not broken:
        assert last["memory_identical"] and last["max_parameter_relative"] <= replay.PARAMETER_TOLERANCE


@pytest.mark.parametrize("broken", ["", "prototype_images"])
def test_simplecil_profile_agrees_with_pilots_own_code_and_the_check_can_fail(official, broken):
    with contextlib.redirect_stdout(sys.stderr):
        report = replay.check("simplecil", broken, tasks=2)
    assert report["agree"] is (broken == ""), report
    if not broken:
        assert all(t["max_parameter_relative"] <= replay.PARAMETER_TOLERANCE for t in report["tasks"])


@pytest.mark.parametrize("broken", ["", "adapter_scale"])
def test_ranpac_profile_trains_as_pilots_own_code_and_differs_only_in_the_head(official, broken):
    """RanPAC: adapters, temporary head and readout (at PILOT's lambda) agree; pilot's lambda is PILOT's rule in
    float64; the logits do not agree (pilot h @ W_o, PILOT's cosine head on W_o's rows), and PILOT's cosine head on
    pilot's readout gives PILOT's logits where PILOT's float32 solve is well conditioned (task 1)."""
    with contextlib.redirect_stdout(sys.stderr):
        report = replay.check("ranpac", broken, tasks=2)
    assert report["agree"] is False
    for task in report["tasks"]:
        assert task["training_agrees"] is (broken == ""), task
        assert task["adapters_moved_by"] > 1e-4  # trained adapters were compared
    first = report["tasks"][0]
    if not broken:
        assert all(t["lambda_ours"] == t["lambda_pilot_rule_in_float64"] for t in report["tasks"])
        assert first["logit_relative"] > 1.0 and first["cosine_on_our_readout_logit_relative"] < 1e-3


@pytest.mark.parametrize("broken", ["", "prompt_position"])
def test_l2p_profile_agrees_with_pilots_own_code_and_the_check_can_fail(official, broken):
    with contextlib.redirect_stdout(sys.stderr):
        report = replay.check("l2p", broken, tasks=2)
    assert report["agree"] is (broken == ""), report
    assert report["tasks"][-1]["prompts_moved_by"] > 1e-4  # trained prompts were compared


@pytest.mark.parametrize("fix, broken", [("", ""), ("prefix_layout", ""), ("prefix_layout", "shared_prompt_pool")])
def test_dualprompt_differs_from_pilots_own_code_by_its_prefix_layout_alone(official, fix, broken):
    """PILOT's EPrompt deals a batch's key/value prefixes out over its samples (a reshape without moving axes):
    pilot disagrees from the first task; with that layout fixed in PILOT's code, both agree, and the check still
    catches an E-prompt that is not started from the previous task's."""
    with contextlib.redirect_stdout(sys.stderr):
        report = replay.check("dualprompt", broken, tasks=2, official_fix=fix)
    assert report["agree"] is (fix == "prefix_layout" and not broken), report
    first = report["tasks"][0]
    if not fix:
        assert not first["agree"] and first["max_parameter_relative"] > 1e-2
    if broken:
        assert first["agree"] and not report["tasks"][1]["agree"]  # the E-prompt copy happens at task 2


@pytest.mark.parametrize("learner, broken", [("fecam", ""), ("fecam", "covariance_ridge"), ("aper_adapter", ""),
                                             ("aper_adapter", "pretrained_branch")])
def test_fecam_and_aper_adapter_profiles_agree_with_pilots_own_code_and_the_check_can_fail(official, learner, broken):
    """Both adapt on the first task as PILOT does (adapters, task-1 cosine head); FeCAM's means and precisions
    (PILOT's covariance, corrcoef(Σ + 100 I)) and APER's prototypes of [pre-trained, adapted] features agree, and
    so do the logits; a pilot-side change to what the classifier is built from is caught."""
    with contextlib.redirect_stdout(sys.stderr):
        report = replay.check(learner, broken, tasks=2)
    assert report["agree"] is (broken == ""), report
    for task in report["tasks"]:
        assert task["adapters_moved_by"] > 1e-3  # trained adapters were compared
        assert task["adapters_relative"] <= replay.PARAMETER_TOLERANCE
        assert task["task1_head_relative"] <= replay.PARAMETER_TOLERANCE
        assert (task["classifier_relative"] > 100 * replay.PARAMETER_TOLERANCE) is bool(broken), task


@pytest.mark.parametrize("broken", ["", "lae_offline_start", "lae_first_freeze"])
def test_lae_profile_agrees_with_pilots_own_code_and_the_check_can_fail(official, broken):
    """LAE under the PILOT profile: online and offline PETs, head and ensemble probabilities agree with PILOT's
    models/lae.py after every task; either PILOT rule switched off on pilot's side is caught at the first task."""
    with contextlib.redirect_stdout(sys.stderr):
        report = replay.check("lae", broken, tasks=2)
    assert report["agree"] is (broken == ""), report
    first = report["tasks"][0]
    assert first["agree"] is (broken == ""), first
    assert first["online_pet_moved_by"] > 1e-4  # trained PETs were compared
    if not broken:  # PILOT's offline PET follows from the first task, and so does pilot's
        assert first["offline_pet_moved_by"] > 1e-4 and first["offline_pet_relative"] <= replay.ADAM_TOLERANCE
        assert all(t["eval_cnn_predictions_identical"] for t in report["tasks"])


def test_p1_banks_give_both_codes_the_same_augmented_batches(tmp_path):
    run = replay.pilot_run("icarl", tmp_path, "", 2)
    banks = replay.image_banks(run, augment=True)
    split = run.stream.tasks[0].train
    theirs = replay.Batches(split.indices, split.labels, banks["train"], 4, 0, True)
    ours = replay.Batches(split.indices, split.labels, banks["train"], 4, 0, True, pilots=True)
    for epoch in range(2):
        for (_, their_images, their_labels), (our_images, our_labels, _) in zip(theirs, ours):
            assert torch.equal(their_images, our_images) and torch.equal(their_labels, our_labels)
    ids = split.indices[:3]
    first = banks["train"].augmented(ids, 0, 0)
    assert torch.equal(first, banks["train"].augmented(ids, 0, 0))  # one seed per (task, epoch, image)
    assert not torch.equal(first, banks["train"].augmented(ids, 0, 1))  # a new draw each epoch
    assert not torch.equal(first, banks["train"][torch.from_numpy(ids)])  # augmented, not the eval images
    unshuffled = replay.Batches(split.indices, split.labels, banks["train"], 4, 0, False)
    assert torch.equal(next(iter(unshuffled))[1], banks["train"][torch.from_numpy(split.indices[:4])])


@pytest.mark.parametrize("flags", [["--learner", "l2p"], ["--break", "kd_temperature"]])
def test_p1_protocol_runs_icarl_and_der_as_they_are(flags, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lamda_official_replay.py", "--protocol", "p1", *flags])
    with pytest.raises(SystemExit) as stop:
        replay.main()
    assert stop.value.code == 2 and "--protocol p1 runs icarl and der as they are" in capsys.readouterr().err
