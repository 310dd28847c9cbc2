import json
import subprocess
import warnings
import sys
from pathlib import Path

import pytest
import torch

from pilot.cli import main
from pilot.config import IGNORED_PILOT_KEYS, PILOT_KEY_ALIASES, parse_override
from pilot.configure import build_config, load_config
from pilot.errors import PilotError
from pilot.learners.slca import SLCA

from conftest import tiny_raw

# The key/value pairs of LAMDA-PILOT's exps/simplecil.json.
PILOT_SIMPLECIL = {
    "prefix": " ", "dataset": "cifar224", "memory_size": 0, "memory_per_class": 0, "fixed_memory": False,
    "shuffle": True, "init_cls": 10, "increment": 10, "model_name": "simplecil",
    "backbone_type": "pretrained_vit_b16_224", "device": ["0"], "seed": [1993], "tuned_epoch": 0,
    "init_lr": 0.01, "batch_size": 256, "weight_decay": 0.05, "min_lr": 1e-8, "optimizer": "sgd",
    "vpt_type": "shallow", "prompt_token_num": 3,
}


def test_pilot_simplecil_config_loads_with_one_warning(tmp_path):
    path = tmp_path / "simplecil.json"
    path.write_text(json.dumps(PILOT_SIMPLECIL))
    with pytest.warns(UserWarning, match="Ignoring PILOT config keys") as caught:
        config = load_config(path)
    assert len(caught) == 1
    assert config.experiment.seed == [1993] and config.experiment.dataset == "cifar224"
    assert {"tuned_epoch", "batch_size"} <= set(config.ignored_keys)
    assert config.experiment.memory_size == 0 and "memory_size" not in config.ignored_keys


def test_memory_keys_for_an_exemplar_free_learner_are_a_warning(tmp_path):
    path = tmp_path / "simplecil.json"
    path.write_text(json.dumps({**PILOT_SIMPLECIL, "memory_size": 2000}))
    with pytest.warns(UserWarning, match=r"'simplecil' is exemplar-free: .*memory_size \(2000\).* are ignored"):
        load_config(path)


def test_unknown_key_names_the_closest_valid_one(tiny_config):
    with pytest.raises(PilotError, match=r"Unknown config key 'init_clss'.*Did you mean 'init_cls'\?"):
        tiny_config(init_clss=10)


def test_wrong_type_is_an_error(tiny_config):
    with pytest.raises(PilotError, match=r"'increment' must be int, got str '10'"):
        tiny_config(increment="10")
    with pytest.raises(PilotError, match=r"'shuffle' must be bool"):
        tiny_config(shuffle=1)


def test_increment_zero_is_an_error(tiny_config):
    with pytest.raises(PilotError, match="increment must be at least 1"):
        tiny_config(increment=0)


def test_unknown_learner_lists_the_known_ones(tiny_config):
    with pytest.raises(PilotError, match=r"Unknown learner \(model_name\) 'simplecill'.*Did you mean 'simplecil'"):
        tiny_config(model_name="simplecill")


def test_learner_keys_are_typed_with_published_defaults(tiny_config):
    config = tiny_config(model_name="linear_probe", init_lr=0.01)
    assert config.learner.init_lr == 0.01 and config.learner.tuned_epoch == 10
    with pytest.raises(PilotError, match="'tuned_epoch' must be int"):
        tiny_config(model_name="linear_probe", tuned_epoch=2.5)


def test_ints_widen_to_float_and_seed_may_be_a_scalar(tiny_config):
    config = tiny_config(model_name="linear_probe", init_lr=1, seed=7)
    assert config.learner.init_lr == 1.0 and isinstance(config.learner.init_lr, float)
    assert config.experiment.seed == [7]


def test_overrides_parse_json_values():
    assert parse_override("seed=[1,2]") == ("seed", [1, 2])
    assert parse_override("prefix=run a") == ("prefix", "run a")
    assert parse_override("shuffle=false") == ("shuffle", False)
    with pytest.raises(PilotError, match="key=value"):
        parse_override("seed")


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(PilotError, match="does not exist"):
        load_config(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{\"seed\": [1],")
    with pytest.raises(PilotError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")


def test_flat_dict_round_trips(tiny_config):
    config = tiny_config(model_name="linear_probe")
    assert build_config(config.to_flat_dict()).to_flat_dict() == config.to_flat_dict()


# Keys of LAMDA-PILOT's exps/l2p.json and exps/dualprompt.json beyond the common ones.
PILOT_L2P = {
    "model_name": "l2p", "backbone_type": "vit_base_patch16_224_l2p", "get_original_backbone": True,
    "tuned_epoch": 5, "init_lr": 0.001875, "batch_size": 16, "weight_decay": 0, "min_lr": 1e-5,
    "optimizer": "adam", "scheduler": "constant", "reinit_optimizer": True, "global_pool": "token",
    "head_type": "prompt", "freeze": ["blocks", "patch_embed", "cls_token", "norm", "pos_embed"],
    "pretrained": True, "drop": 0.0, "drop_path": 0.0, "prompt_pool": True, "size": 10, "length": 5,
    "top_k": 5, "initializer": "uniform", "prompt_key": True, "prompt_key_init": "uniform",
    "use_prompt_mask": False, "shared_prompt_pool": False, "shared_prompt_key": False,
    "batchwise_prompt": True, "embedding_key": "cls", "predefined_key": "", "pull_constraint": True,
    "pull_constraint_coeff": 0.1,
}
PILOT_DUALPROMPT = {
    **PILOT_L2P, "model_name": "dualprompt", "backbone_type": "vit_base_patch16_224_dualprompt",
    "batch_size": 24, "init_lr": 0.001, "head_type": "token", "use_g_prompt": True, "g_prompt_length": 5,
    "g_prompt_layer_idx": [0, 1], "use_prefix_tune_for_g_prompt": True, "use_e_prompt": True,
    "e_prompt_layer_idx": [2, 3, 4], "use_prefix_tune_for_e_prompt": True, "top_k": 1,
    "use_prompt_mask": True, "shared_prompt_pool": True, "same_key_value": False,
}


@pytest.mark.parametrize("raw", [PILOT_L2P, PILOT_DUALPROMPT], ids=["l2p", "dualprompt"])
def test_pilot_prompt_configs_load(raw):
    common = {k: v for k, v in PILOT_SIMPLECIL.items() if k in ("prefix", "dataset", "shuffle", "init_cls", "increment", "device", "seed")}
    with pytest.warns(UserWarning, match="batchwise_prompt"):
        config = build_config({**common, **raw})
    assert config.learner.batch_size == raw["batch_size"] and config.learner.top_k == raw["top_k"]
    if raw["model_name"] == "dualprompt":
        assert config.learner.shared_prompt_pool and config.learner.e_prompt_layer_idx == [2, 3, 4]


def test_repo_configs_load():
    from pathlib import Path

    exps = Path(__file__).resolve().parents[1] / "exps"
    for path in sorted([*exps.glob("*.json"), *exps.glob("domainnet/*.json")]):
        load_config(path)


def test_pilots_own_configs_run_on_the_machine_they_find_without_a_warning(monkeypatch):
    """quickstart and the small protocols (P0, P1) use CUDA where there is one, else the CPU, silently; so does a
    config that names no device. PILOT's own files keep their GPU ids (and warn on a CPU)."""
    import torch

    from pilot.assembly import resolve_device

    exps = Path(__file__).resolve().parents[1] / "exps"
    own = sorted([*exps.glob("*quickstart.json"), *exps.glob("*_p0.json"), *exps.glob("*_p1.json")])
    assert exps / "quickstart.json" in own and len(own) > 20
    devices = {path.name: load_config(path).experiment.device for path in own}
    for has_cuda, expected in ((False, "cpu"), (True, "cuda")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: has_cuda)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert resolve_device(devices["quickstart.json"]).type == expected
            assert resolve_device(build_config({}).experiment.device).type == expected
            assert all(resolve_device(device).type in ("cpu", expected) for device in devices.values())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="asks for CUDA, which is not available"):
        assert resolve_device(load_config(exps / "l2p.json").experiment.device).type == "cpu"


SLCA_JSON = Path(__file__).resolve().parents[1] / "exps" / "slca.json"


def tiny_slca_overrides(tmp_path) -> list[str]:
    """--set lines that turn exps/slca.json into a 2-task run of a tiny random ViT on synthetic images."""
    tiny = {k: v for k, v in tiny_raw(tmp_path).items() if k != "model_name"}
    return [f"{key}={json.dumps(value)}" for key, value in {**tiny, "max_tasks": 2}.items()]


def test_set_tuned_epoch_on_slca_trains_that_many_epochs(tmp_path, monkeypatch):
    # exps/slca.json is PILOT's: it says "epochs": 20 and "lrate": 0.01 (SLCA's names for tuned_epoch, init_lr).
    assert json.loads(SLCA_JSON.read_text())["epochs"] == 20
    epochs = []
    monkeypatch.setattr(SLCA, "begin_epoch", lambda self, task, epoch: epochs.append((task.index, epoch)))
    overrides = tiny_slca_overrides(tmp_path) + ["tuned_epoch=1", "milestones=[]"]
    config = load_config(SLCA_JSON, overrides)
    assert config.learner.tuned_epoch == 1 and config.learner.init_lr == 0.01
    assert main(["--config", str(SLCA_JSON), *[f"--set={o}" for o in overrides]]) == 0
    assert epochs == [(0, 0), (1, 0)]
    results = json.loads(next((tmp_path / "logs").rglob("results.json")).read_text())
    assert results["config"]["tuned_epoch"] == 1 and "epochs" not in results["config"]


def test_pilot_key_aliases_work_alone_and_conflict_clearly(tmp_path):
    with pytest.warns(UserWarning, match=r"milestones \[18\] are at or past the last epoch \(1 epochs\)"):
        load_config(SLCA_JSON, tiny_slca_overrides(tmp_path) + ["epochs=1"])  # the alias reaches the same field
    config = build_config(tiny_raw(tmp_path, model_name="slca", lrate=0.5, lrate_decay=0.2, epochs=3, tuned_epoch=3,
                                    milestones=[2]))
    assert (config.learner.init_lr, config.learner.lr_decay, config.learner.tuned_epoch) == (0.5, 0.2, 3)
    with pytest.raises(PilotError, match=r"sets both 'epochs' \(20\) and 'tuned_epoch' \(1\).*Keep one"):
        build_config(tiny_raw(tmp_path, model_name="slca", epochs=20, tuned_epoch=1))
    with pytest.raises(PilotError, match=r"--set sets both 'lrate'"):
        load_config(SLCA_JSON, tiny_slca_overrides(tmp_path) + ["lrate=0.1", "init_lr=0.2"])
    # An alias names a field only where the learner has that field.
    with pytest.raises(PilotError, match="Unknown config key 'epochs' for learner 'simplecil'"):
        build_config(tiny_raw(tmp_path, epochs=1))


def test_importing_the_config_schema_imports_no_learner():
    code = ("import sys, pilot.config; "
            "loaded = [m for m in sys.modules if m.startswith('pilot.learners')]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_reproduction_configs_load_and_comments_are_ignored():
    folder = Path(__file__).resolve().parents[1] / "exps" / "reproduce"
    paths = sorted(folder.glob("*/*.json"))
    assert {path.parent.name for path in paths} == {"pilot", "official"}
    for path in paths:
        raw = json.loads(path.read_text())
        assert raw["_comment"], f"{path} says where its settings come from"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = load_config(path)
        assert "_comment" not in config.to_flat_dict()
        assert config.experiment.preprocess == path.parent.name


EXPS = Path(__file__).resolve().parents[1] / "exps"
# LAMDA-PILOT's exps/ at commit 2647455 but for the *_inr.json files, unchanged in exps/lamda_pilot/.
PILOT_METHOD_CONFIGS = [
    "aper_aperpter", "aper_finetune", "aper_ssf", "aper_vpt_deep", "aper_vpt_shallow", "coda_prompt", "cofima",
    "coil", "der", "dgr", "dualprompt", "duct", "ease", "fecam", "finetune", "foster", "icarl", "l2p", "lae", "memo",
    "mos", "ranpac", "simplecil", "slca"]
# Where exps/<learner>.json is not PILOT's file as it is (same keys and values): why. Every one clears PILOT's
# prefix (" " would start the run folder's name with a space; "reproduce" names PILOT's reproduction runs).
OWN_VARIANTS = {
    "aper_aperpter": "PILOT's name of exps/aper_adapter.json; its VPT keys and zero memory keys dropped",
    "coda_prompt": "PILOT's model-file switches (drop, drop_path, reinit_optimizer) and zero memory keys dropped",
    "cofima": "model_postfix (a log name) dropped; bcb_lrscale and fishermax written out at their defaults",
    "dualprompt": "no batch-wise prompt vote (exps/reproduce/pilot/dualprompt.json has PILOT's); clip_grad 1.0 as "
                  "the official code; PILOT's prompt-model switches dropped",
    "l2p": "no batch-wise prompt vote (exps/reproduce/pilot/l2p.json has PILOT's); clip_grad 1.0 as the official "
           "code; PILOT's prompt-model switches dropped",
    "lae": "PILOT's model-file switches dropped; adapt_blocks written out at its default",
    "ranpac": "its VPT keys and use_simplecil dropped; scheduler written out at its default",
    "simplecil": "the training keys its tuned_epoch 0 never uses dropped",
    "slca": "model_postfix (a log name) dropped; bcb_lrscale written out at its default",
}
ALLOWED_WARNINGS = ("Ignoring PILOT config keys", "does not decay", "batchwise_prompt: true")


@pytest.mark.parametrize("name", PILOT_METHOD_CONFIGS)
def test_pilots_method_configs_load_unchanged(name):
    """exps/lamda_pilot/<name>.json are PILOT's files as they are: every key lands in the typed config (under
    PILOT's other name where it has one) or is one of the no-ops IGNORED_PILOT_KEYS lists, and only those and the
    documented warnings (no decay before the milestones; the batch-wise prompt vote) are raised."""
    path = EXPS / "lamda_pilot" / f"{name}.json"
    raw = json.loads(path.read_text())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_config(path)
    messages = [str(w.message) for w in caught]
    assert all(any(allowed in m for allowed in ALLOWED_WARNINGS) for m in messages), messages
    assert sum("does not decay" in m for m in messages) <= 1  # one warning for all of a run's phases
    assert config.experiment.model_name == raw["model_name"]
    experiment, learner = config.experiment.__dict__, config.learner.__dict__
    for key, value in raw.items():
        field = PILOT_KEY_ALIASES.get(key) if key not in learner and PILOT_KEY_ALIASES.get(key) in learner else key
        if field in learner:
            assert learner[field] == value, key
        elif field in experiment:
            assert experiment[field] == value, key
        else:
            assert key in config.ignored_keys and key in IGNORED_PILOT_KEYS, key


def test_exps_hold_pilots_configs_or_say_why_not():
    """exps/<learner>.json is PILOT's file (the same keys and values) unless OWN_VARIANTS says why it differs."""
    assert sorted(path.stem for path in (EXPS / "lamda_pilot").glob("*.json")) == PILOT_METHOD_CONFIGS
    for name in PILOT_METHOD_CONFIGS:
        ours = EXPS / f"{'aper_adapter' if name == 'aper_aperpter' else name}.json"
        same = ours.is_file() and json.loads(ours.read_text()) == json.loads((EXPS / "lamda_pilot" / f"{name}.json").read_text())
        assert same != (name in OWN_VARIANTS), name


@pytest.mark.parametrize("name", ["finetune", "icarl", "der", "memo", "coil"])
def test_milestones_past_the_last_epoch_warn_once_and_never_decay(name):
    """PILOT's configs whose MultiStepLR milestones lie past every phase's epochs: one warning names them all, and
    the run's schedules keep the rate, as PILOT's do."""
    from pilot.learners import learner_class
    from pilot.learners._gradient import make_scheduler

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_config(EXPS / "lamda_pilot" / f"{name}.json")
    decay = [str(w.message) for w in caught if "does not decay" in str(w.message)]
    assert len(decay) == 1, decay
    cls = learner_class(name)
    for first_task in (True, False):
        settings = cls.settings(config.learner, first_task)
        assert settings.scheduler == "steplr" and f"milestones {settings.milestones}" in decay[0]
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=settings.init_lr)
        scheduler = make_scheduler(optimizer, settings)
        for _ in range(settings.tuned_epoch):
            assert optimizer.param_groups[0]["lr"] == settings.init_lr
            scheduler.step()
