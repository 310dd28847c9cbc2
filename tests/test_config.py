import json

import pytest

from pilot.config import build_config, load_config, parse_override
from pilot.errors import PilotError

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
    assert {"memory_size", "tuned_epoch", "batch_size"} <= set(config.ignored_keys)


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

    for path in sorted(Path(__file__).resolve().parents[1].glob("exps/*.json")):
        load_config(path)
