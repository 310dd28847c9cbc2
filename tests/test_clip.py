"""CLIP's text side on a tiny random open_clip model: templates, text features encoded once, zero-shot
logits by hand, zs_clip, clip_proto, simplecil and ranpac on an open_clip backbone, and the bad inputs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from conftest import clean_error, tiny_raw
from pilot.assembly import assemble
from pilot.backbones import create_backbone, parse_backbone
from pilot.clip import class_embeddings, default_templates, resolve_templates
from pilot.configure import build_config
from pilot.engine import run_experiment
from pilot.errors import PilotError

# The smallest open_clip model whose text tower takes CLIP's tokenizer (its vocabulary of 49408 tokens).
TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
TEMPLATES = ["a photo of a {}.", "a drawing of the {}."]


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory) -> str:
    """The path of the tiny model's open_clip config: ``open_clip:<path>`` names it in a config."""
    path = tmp_path_factory.mktemp("clip") / "pilot-tiny-text-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return str(path)


def clip_raw(tmp_path: Path, model: str, **overrides) -> dict:
    return tiny_raw(tmp_path, **{"model_name": "zs_clip", "backbone_type": f"open_clip:{model}", "backbone_args": {},
                                 "templates": TEMPLATES, **overrides})


def hand_weights(backbone, names: list[str]) -> torch.Tensor:
    """Each template filled, encoded, normalised; averaged per class; renormalised (PROOF's zs_clip)."""
    model, tokenizer = backbone.text.model, backbone.text.tokenizer
    rows = []
    with torch.no_grad():
        for name in names:
            each = model.encode_text(tokenizer([t.format(name) for t in TEMPLATES]))
            mean = (each / each.norm(dim=-1, keepdim=True)).mean(0)
            rows.append(mean / mean.norm())
    return torch.stack(rows)


def test_default_templates_are_proofs_per_dataset_sets():
    assert len(default_templates("cifar224")) == len(default_templates("cifar100")) == 18
    assert default_templates("cifar224")[0] == "a photo of a {}."
    assert len(default_templates("imagenetr")) == 7 and default_templates("imagenetr")[0] == "itap of a {}."
    assert default_templates("cub") == ["a photo of a {}, a type of bird."]
    assert default_templates("synthetic") == ["a photo of a {}."]


def test_templates_from_a_json_file_and_by_default(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps(TEMPLATES))
    assert resolve_templates(str(tmp_path / "t.json"), "cifar224") == TEMPLATES
    assert resolve_templates([], "cub") == resolve_templates("", "cub") == default_templates("cub")


def test_open_clip_weight_tags_parse():
    import open_clip

    for tag in ("openai", "laion400m_e32"):
        name, random_init, blocks = parse_backbone(f"open_clip:ViT-B-16:{tag}")
        assert (name, random_init, blocks) == (f"open_clip:ViT-B-16:{tag}", False, 0)
        assert name.removeprefix("open_clip:").partition(":") == ("ViT-B-16", ":", tag)
        assert tag in open_clip.list_pretrained_tags_by_model("ViT-B-16")


def test_zero_shot_logits_by_hand_and_text_encoded_once_per_name(tmp_path, clip_model):
    run = assemble(build_config(clip_raw(tmp_path, clip_model, max_tasks=2)))
    ctx, learner = run.ctx, run.learner
    calls = []
    encode = ctx.text_features.tower.encode
    ctx.text_features.tower.encode = lambda texts, device: calls.append(list(texts)) or encode(texts, device)
    tasks = run.stream.tasks
    for task in tasks:
        ctx.open_fit(task)
        learner.fit(task)
        ctx.open_evaluation([task])
        logits = learner.predict(task.test)
    names = run.stream.class_names
    assert ctx.class_names == names
    image = ctx.features(task.test)
    scale = run.backbone.text.model.logit_scale.exp()
    expected = scale * (image / image.norm(dim=-1, keepdim=True)) @ hand_weights(run.backbone, names).T
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # every class name under every template passed through the text tower once, as its task arrived
    assert sorted(text for call in calls for text in call) == sorted(t.format(n) for n in names for t in TEMPLATES)
    assert len(calls) == len(tasks) and ctx.text_features.encoded_texts == len(names) * len(TEMPLATES)


def test_class_embeddings_average_normalised_features():
    rows = torch.tensor([[[3.0, 4.0], [0.0, 2.0]]])  # one class, two templates
    torch.testing.assert_close(class_embeddings(rows), F.normalize(torch.tensor([[0.3, 0.9]]), dim=-1))


def test_text_features_persist_in_the_feature_cache(tmp_path, clip_model):
    cache = str(tmp_path / "cache")
    first, again = (assemble(build_config(clip_raw(tmp_path, clip_model, feature_cache_dir=cache))).ctx.text_features
                    for _ in range(2))
    first(["cat", "dog"], TEMPLATES)
    assert first.encoded_texts == 4 and len(list(Path(cache).glob("text-features-*.safetensors"))) == 1
    torch.testing.assert_close(again(["dog"], TEMPLATES), first(["dog"], TEMPLATES))
    assert again.encoded_texts == 0


def test_clip_proto_sums_text_and_prototype_cosines(tmp_path, clip_model):
    run = assemble(build_config(clip_raw(tmp_path, clip_model, model_name="clip_proto")))
    task = run.stream.tasks[0]
    run.ctx.open_fit(task)
    run.learner.fit(task)
    run.ctx.open_evaluation([task])
    logits = run.learner.predict(task.test)
    run.ctx.access.open()
    train, test = run.ctx.features(task.train), run.ctx.features(task.test)
    labels = torch.as_tensor(task.train.labels)
    prototypes = torch.stack([F.normalize(train[labels == c], dim=-1).mean(0) for c in task.classes])
    text = hand_weights(run.backbone, run.ctx.class_names)
    expected = F.normalize(test, dim=-1) @ text.T + F.normalize(test, dim=-1) @ F.normalize(prototypes, dim=-1).T
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("learner, extra", [("simplecil", {}), ("ranpac", {"tuned_epoch": 0, "M": 64})])
def test_image_learners_take_an_open_clip_backbone(tmp_path, clip_model, learner, extra):
    (results,) = run_experiment(build_config(clip_raw(tmp_path, clip_model, model_name=learner, max_tasks=1, **extra)))
    assert results["completed_tasks"] == 1 and results["backbones"][0]["feature_dim"] == TINY_CLIP["embed_dim"]
    assert "templates" not in results  # recorded for the learners that read text


def test_a_local_checkpoint_brings_its_text_tower(tmp_path, clip_model):
    import open_clip

    source = create_backbone(f"open_clip:{clip_model}", pretrained=False, seed=7)
    tensors = source.text.model.state_dict()
    save_file(tensors, tmp_path / "whole.safetensors")
    save_file({k: v for k, v in tensors.items() if k.startswith("visual.")}, tmp_path / "image_only.safetensors")
    whole = create_backbone(f"open_clip:{clip_model}", pretrained_path=str(tmp_path / "whole.safetensors"))
    tokens = open_clip.get_tokenizer("pilot-tiny-text-clip")(["a photo of a cat."])
    with torch.no_grad():
        torch.testing.assert_close(whole.text.model.encode_text(tokens), source.text.model.encode_text(tokens))
    assert "file-sha256" in whole.identity
    image_only = create_backbone(f"open_clip:{clip_model}", pretrained_path=str(tmp_path / "image_only.safetensors"))
    assert image_only.text is None and "text-side tensor(s) missing from the weights file" in image_only.text_missing
    raw = clip_raw(tmp_path, clip_model, pretrained=True, pretrained_path=str(tmp_path / "image_only.safetensors"))
    with pytest.raises(PilotError, match=r"zs_clip classifies through CLIP's text tower, which the backbone lacks "
                                         r"\(\d+ text-side tensor"):
        run_experiment(build_config(raw))
    assert not (tmp_path / "logs").exists()


@clean_error
@pytest.mark.parametrize("overrides, message", [
    ({"backbone_type": "vit_tiny_patch16_224"}, r"zs_clip classifies through CLIP's text tower, but backbone_type "
                                                r"'vit_tiny_patch16_224' is not an open_clip model"),
    ({"model_name": "proof", "memory_size": 20, "backbone_type": ["open_clip:a", "open_clip:b"]},
     r"proof classifies through CLIP's text tower, but backbone_type \[.*\] is not an open_clip model"),
    ({"templates": ["a photo of a {}.", "a photo of a cat."]},
     r"templates: entry 1 is 'a photo of a cat\.', which needs exactly one '\{\}' where the class name goes"),
    ({"templates": ["a {} {0}"]}, r"whose other braces are not literal text"),
])
def test_bad_clip_inputs_are_refused_before_anything_is_written(tmp_path, clip_model, overrides, message):
    raw = clip_raw(tmp_path, clip_model, **overrides)
    with pytest.raises(PilotError, match=message):
        run_experiment(build_config(raw))
    assert not (tmp_path / "logs").exists()


@clean_error
def test_a_class_name_list_of_the_wrong_length_is_refused(tmp_path, clip_model):
    with pytest.raises(PilotError, match=r"class_names lists 3 names but synthetic has 10 classes"):
        run_experiment(build_config(clip_raw(tmp_path, clip_model, class_names=["a", "b", "c"])))
    assert not (tmp_path / "logs").exists()


@clean_error
def test_a_templates_file_that_is_missing_is_refused(tmp_path, clip_model):
    with pytest.raises(PilotError, match=r"templates file '.*nowhere\.json' not found"):
        build_config(clip_raw(tmp_path, clip_model, templates=str(tmp_path / "nowhere.json")))


@clean_error
def test_clip_table_says_when_the_weights_are_missing(tmp_path, monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("clip_table", Path(__file__).resolve().parents[1] / "tools" / "clip_table.py")
    clip_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(clip_table)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert clip_table.main(["--weights-dir", str(tmp_path), "--log-dir", str(tmp_path / "logs"), "--tag", "openai"]) == 2
    message = capsys.readouterr().err
    assert "clip_table: no CLIP weights for 'open_clip:ViT-B-16:openai', so nothing was run." in message
    assert f"no local file '{tmp_path / 'ViT-B-16_openai.safetensors'}'" in message and "--checkpoint" in message
    assert not (tmp_path / "logs").exists()


def test_zero_shot_clip_runs_a_domain_stream(tmp_path, clip_model):
    domains = {"dataset": "synthetic_domains", "scenario": "domain", "synthetic_classes": 3, "synthetic_per_class": 4,
               "synthetic_domains": 3, "shuffle": False}
    (results,) = run_experiment(build_config(clip_raw(tmp_path, clip_model, **domains)))
    assert results["templates"] == TEMPLATES and results["completed_tasks"] == 3 and results["counts"]["total"] == [[6] * (t + 1) for t in range(3)]
