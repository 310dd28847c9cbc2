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
import lamda_official_replay as replay  # noqa: E402  (imported by name: the family files register into it)
import lamda_replay_slca  # noqa: E402

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
    manager, schedule = replay.FakeDataManager(run, banks), replay.Schedule()
    classes = run.stream.tasks[0].classes
    for mode in ("train", "test"):  # PILOT's shuffled test-mode loaders (RanPAC's protonet one) are not augmented
        dataset = manager.get_dataset(classes, "train", mode)
        positions, images, _ = next(iter(schedule.loader(dataset, 4, shuffle=True)))
        eval_images = banks["train"][torch.from_numpy(dataset.images[positions.numpy()])]
        assert torch.equal(images, eval_images) is (mode == "test")


@pytest.mark.parametrize("flags, message", [
    (["--protocol", "p1", "--learner", "simplecil"], "p1 runs icarl, der, l2p, dualprompt, lae, ranpac, "),
    (["--protocol", "p1", "--learner", "l2p", "--break", "prompt_position"], "(no --break)"),
    (["--protocol", "p1", "--break", "kd_temperature"], "(no --break)"),
    (["--protocol", "p1", "--learner", "l2p", "--official-fix", "prefix_layout"], "needs --learner dualprompt"),
    (["--learner", "l2p", "--official-fix", "eval_pulls"], "needs --learner mos"),
    (["--protocol", "p1", "--learner", "lae", "--set", "tuned_epoch"], "--set tuned_epoch: expected KEY=JSON"),
    (["--learner", "lae", "--set", "tuned_epoch=1"], "--set is for --protocol p1 trials")])
def test_p1_protocol_refuses_what_it_does_not_run(flags, message, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lamda_official_replay.py", *flags])
    with pytest.raises(SystemExit) as stop:
        replay.main()
    assert stop.value.code == 2 and message in capsys.readouterr().err


class ConfigSeen(Exception):
    pass


@pytest.mark.parametrize("learner", ["l2p", "dualprompt", "lae", "ranpac", "slca", "cofima", "aper_vpt_deep",
                                     "aper_vpt_shallow", "aper_finetune", "finetune", "mos"])
def test_p1_side_of_pilot_is_the_config_reproduce_runs_as_its_pilot_profile(learner, tmp_path, monkeypatch):
    """pilot's side on P1 is exactly tools/reproduce.py's `pilot` column: exps/<learner>_p1.json with the profile's
    overrides (LAE keeps P1's num_freeze_epochs 2 where the profile file says PILOT's 3, as reproduce.py does)."""
    import reproduce

    def seen(config):
        raise ConfigSeen(config)

    monkeypatch.setattr(reproduce, "run_experiment", seen)
    with pytest.raises(ConfigSeen) as theirs:
        reproduce.measure(learner, "p1", reproduce.profile_overrides(learner, "pilot"), "/assets", str(tmp_path))
    local = {"log_dir", "data_path", "weights_dir", "download", "progress", "device"}
    expected, ours = theirs.value.args[0], replay.p1_run_config(learner, tmp_path)
    flat = {k: v for k, v in ours.to_flat_dict().items() if k not in local}
    assert flat == {k: v for k, v in expected.to_flat_dict().items() if k not in local}
    assert type(ours.learner) is type(expected.learner) and flat["preprocess"] == "pilot"
    assert flat["max_tasks"] == 3 and flat["train_per_class"] == 50  # P1's protocol keys, not the profile's
    if learner == "lae":
        assert flat["num_freeze_epochs"] == 2 and flat["offline_from_start"] and flat["freeze_first_task"]
    trial = replay.p1_run_config(learner, tmp_path, {"batch_size": 4, "max_tasks": 1}).to_flat_dict()
    assert (trial["batch_size"], trial["max_tasks"]) == (4, 1)  # --set and --tasks laid over last


def test_pilots_vit_classes_at_deit_tiny_layout_give_timms_features(official):
    """On P1 PILOT's ViT classes are built at pilot's DeiT-Tiny layout (224, patch 16, width 192, depth 12, 3 heads)
    and loaded through PILOT's own checkpoint_filter_fn: with a random timm ViT-Ti in pilot's place, each un-prompted
    one computes timm's features."""
    import timm
    from types import SimpleNamespace
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    run = SimpleNamespace(ctx=SimpleNamespace(backbone=SimpleNamespace(model=vit)))
    assert replay.vit_size(run) == {"img_size": 224, "patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 3}
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = vit.forward_features(images)
        assert torch.allclose(replay.lae_vit(run).eval()(images), expected, atol=1e-5)
        args = {**replay.p1_args("l2p"), "nb_classes": 100}
        prompted, original = replay.prompt_vits("l2p", run, args)
        assert torch.allclose(original(images)["pre_logits"], expected[:, 0], atol=1e-5)
    assert prompted.head.weight.shape == (100, 192) and prompted.prompt.prompt.shape == (10, 5, 192)


def test_p1_result_gives_both_curves_and_their_averages():
    reports = [{"accuracy_pilot": 80.0, "accuracy_ours": 80.0, "agree": True},
               {"accuracy_pilot": 61.5, "accuracy_ours": 60.0, "agree": False}]
    result = replay.profile_result("l2p", "p1", reports)
    assert result["curve_pilot"] == [80.0, 61.5] and result["average_pilot"] == 70.75
    assert result["curve_ours"] == [80.0, 60.0] and result["average_ours"] == 70.0
    assert not result["curves_identical"] and not result["agree"]
    assert "curve_ours" not in replay.profile_result("l2p", "tiny", reports)


# --- the family files (tools/lamda_replay_*.py) ---


@pytest.mark.parametrize("learner", ["aper_vpt_deep", "aper_vpt_shallow"])
def test_aper_vpt_profile_agrees_with_pilots_own_code(official, learner):
    with contextlib.redirect_stdout(sys.stderr):
        report = replay.check(learner, tasks=2)
    assert report["agree"], report
    for task in report["tasks"]:
        assert task["prompts_moved_by"] > 5e-3  # trained prompts were compared
        assert task["prompts_relative"] <= replay.PARAMETER_TOLERANCE
        assert task["prompted_prototypes_relative"] <= replay.PARAMETER_TOLERANCE
        assert task["branches"] == 2  # PILOT's dual-branch network was compared, not its first-task net
        assert task["own_prompts_identical"]  # both start at zero: copying PILOT's prompts changed nothing


@pytest.mark.parametrize("learner, broken", [("aper_vpt_shallow", "prompt_span"),
                                             ("aper_vpt_deep", "prompt_position_embedding")])
def test_aper_vpt_check_fails_when_pilots_prompts_are_wired_otherwise(official, learner, broken):
    with contextlib.redirect_stdout(sys.stderr):
        report = replay.check(learner, broken, tasks=1)
    assert report["agree"] is False
    first = report["tasks"][0]
    assert first["prompts_relative"] > 0.1 and first["pretrained_prototypes_relative"] <= replay.PARAMETER_TOLERANCE


@pytest.mark.parametrize("broken, tasks", [("", 2), ("tuned_in_place", 1), ("frozen_sigma", 1)])
def test_aper_finetune_profile_agrees_with_pilots_own_code_and_the_check_can_fail(official, broken, tasks):
    """The whole ViT fine-tuned from PILOT's drawn cosine head agrees bit for bit; tuning the pre-trained ViT in
    place (no frozen branch) changes the prototypes alone, a fixed sigma the tuned ViT itself."""
    with contextlib.redirect_stdout(sys.stderr):
        report = replay.check("aper_finetune", broken, tasks)
    assert report["agree"] is (broken == ""), report
    for task in report["tasks"]:
        assert task["tuned_vit_moved_by"] > 1e-3  # trained weights were compared
        assert (task["tuned_vit_relative"] > 100 * replay.PARAMETER_TOLERANCE) is (broken == "frozen_sigma"), task
        assert (task["pretrained_branch_relative"] > 1.0) is (broken == "tuned_in_place"), task
        assert (task["prototypes_relative"] > 10 * replay.PARAMETER_TOLERANCE) is bool(broken), task


@pytest.mark.parametrize("broken", ["", "unmasked_old_logits"])
def test_finetune_profile_agrees_with_pilots_own_code_and_the_check_can_fail(official, broken):
    """Finetune: the ViT and the growing head agree after each task; training later tasks on every seen class's
    logits (PILOT: the new classes' alone) is caught at the second task."""
    with contextlib.redirect_stdout(sys.stderr):
        report = replay.check("finetune", broken, tasks=2)
    first, second = report["tasks"]
    assert first["agree"] and second["agree"] is (broken == ""), report
    assert second["vit_moved_by"] > 1e-2
    assert (second["head_relative"] > 1e-2) is bool(broken), second


def check_mos(broken="", official_fix=""):
    with contextlib.redirect_stdout(sys.stderr):
        return replay.check("mos", broken, tasks=2, official_fix=official_fix)


@pytest.mark.parametrize("broken", ["", "forward_merge"])
def test_mos_profile_agrees_with_pilots_code_without_its_eval_pulls_and_the_check_can_fail(official, broken):
    report = check_mos(broken, "eval_pulls")
    assert report["agree"] is (broken == ""), report
    first, second = report["tasks"]
    assert first["agree"]  # no earlier adapter to merge towards in the first task: the break acts from the second
    assert second["adapters_moved_by"] > 1e-2  # trained adapters were compared
    if not broken:
        assert second["max_parameter_relative"] <= replay.PARAMETER_TOLERANCE


def test_pilots_own_mos_pulls_adapters_outside_training(official):
    """PILOT as it is: the first task agrees; from the second, its statistics pass has pulled the current adapter
    and its test forwards the stored one, while the stored adapter as trained agrees."""
    first, second = check_mos()["tasks"]
    assert first["agree"] and not second["agree"]
    assert second["stored_adapters_relative"] <= replay.PARAMETER_TOLERANCE
    assert second["current_adapter_relative"] > 1e-2 and second["their_eval_pulled_stored_adapters_by"] > 1e-3


@pytest.mark.parametrize("broken", ["", "ca_mean_shrink", "aligned_heads_kept"])
def test_slca_profile_agrees_with_pilots_own_code_and_the_check_can_fail(official, broken):
    with contextlib.redirect_stdout(sys.stderr):
        report = replay.check("slca", broken, tasks=2)
    assert report["agree"] is (broken == ""), report
    aligned = report["tasks"][-1]
    assert aligned["vit_moved_by"] > 1e-4 and aligned["ca_moved_heads_by"] > 0.1  # trained and aligned weights compared
    assert aligned["ca_epochs_compared"] == replay.PROFILE_SETTINGS["slca"]["ca_epochs"]
    if not broken:
        assert all(t["max_parameter_relative"] <= replay.PARAMETER_TOLERANCE for t in report["tasks"])
    elif broken == "ca_mean_shrink":  # the Gaussians agree; what is drawn from them does not
        assert aligned["gaussians_relative"] <= replay.PARAMETER_TOLERANCE < aligned["ca_features_relative"]
    else:  # the aligned heads agree; the next task's starting heads do not
        assert aligned["aligned_head_relative"] <= replay.PARAMETER_TOLERANCE < aligned["trained_head_relative"]


@pytest.mark.parametrize("broken", ["", "own_old_head_fisher", "new_head_trained"])
def test_cofima_profile_agrees_with_pilots_own_code_and_the_check_can_fail(official, broken):
    """Three tasks: the old heads' stale-gradient Fisher (the profile's old_head_fisher) first matters at the third,
    where the heads merged are the aligned ones of the second and the trained ones of the third."""
    with contextlib.redirect_stdout(sys.stderr):
        report = replay.check("cofima", broken, tasks=3 if not broken else 2)
    assert report["agree"] is (broken == ""), report
    merged = report["tasks"][1]
    if not broken:
        assert all(t["max_parameter_relative"] <= replay.PARAMETER_TOLERANCE for t in report["tasks"])
        assert report["tasks"][-1]["old_head_fisher_relative"] <= replay.PARAMETER_TOLERANCE
    elif broken == "own_old_head_fisher":
        assert merged["old_head_fisher_relative"] > lamda_replay_slca.FISHER_TOLERANCE
    else:
        assert merged["aligned_head_relative"] > replay.PARAMETER_TOLERANCE
