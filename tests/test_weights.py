"""Local weights files load strictly, and a backbone's identity names all that its features depend on."""
import shutil

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import pilot.digests as digests
from pilot.backbones import create_backbone
from pilot.errors import PilotError

from conftest import DEIT_WEIGHTS, TINY_VIT, clean_error, correct_result
from test_backbones import register_tiny_open_clip

TINY = "vit_tiny_patch16_224"
DEIT = "deit_tiny_patch16_224"
requires_deit = pytest.mark.skipif(not DEIT_WEIGHTS.is_file(),
                                   reason=f"DeiT-Tiny weights not found at {DEIT_WEIGHTS} (see docs/tests.md)")


def tiny_weights(tmp_path, name="tiny.safetensors", change=lambda tensors: None) -> str:
    """A random 2-block ViT's weights as timm saves them (1000-class head included), after ``change``."""
    torch.manual_seed(0)
    tensors = timm.create_model(TINY, pretrained=False, **TINY_VIT).state_dict()
    change(tensors)
    save_file(tensors, tmp_path / name)
    return str(tmp_path / name)


def features(path: str, **args) -> torch.Tensor:
    size = args.get("img_size", TINY_VIT["img_size"])
    with torch.no_grad():
        return create_backbone(TINY, pretrained_path=path, **{**TINY_VIT, **args}).eval()(torch.ones(2, 3, size, size))


# --- strict loading ---------------------------------------------------------------------------------


@clean_error
def test_resnet_weights_for_a_vit_are_refused(tmp_path):
    path = tmp_path / "resnet18.safetensors"
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(PilotError) as error:
        create_backbone(DEIT, pretrained_path=str(path))
    message = str(error.value)
    assert f"Weights file '{path}' does not fit backbone '{DEIT}'" in message
    assert "150 backbone tensor(s) missing from the file: blocks.0.attn.proj.bias" in message
    assert "tensor(s) in the file that the backbone lacks: bn1.bias" in message
    assert "for another architecture" in message and "set backbone_type" in message


@clean_error
def test_a_missing_tensor_is_refused_by_name_also_in_a_set(tmp_path):
    path = tiny_weights(tmp_path, f"{TINY}.safetensors", lambda tensors: tensors.pop("blocks.1.mlp.fc2.bias"))
    missing = r"1 backbone tensor\(s\) missing from the file: blocks\.1\.mlp\.fc2\.bias\."
    with pytest.raises(PilotError, match=missing):
        create_backbone(TINY, pretrained_path=path, **TINY_VIT)
    with pytest.raises(PilotError, match=missing):  # a member of a set, its file found in weights_dir
        create_backbone([f"random:{TINY}", TINY], weights_dir=str(tmp_path), **TINY_VIT)


@requires_deit
@clean_error
def test_the_real_deit_file_missing_a_tensor_is_refused_by_name(tmp_path):
    tensors = load_file(DEIT_WEIGHTS)
    del tensors["blocks.11.mlp.fc2.bias"]
    save_file(tensors, tmp_path / "deit.safetensors")
    with pytest.raises(PilotError, match=rf"'{DEIT}': 1 backbone tensor\(s\) missing from the file: "
                                         r"blocks\.11\.mlp\.fc2\.bias\."):
        create_backbone(DEIT, pretrained_path=str(tmp_path / "deit.safetensors"))


@requires_deit
@pytest.mark.parametrize("args", [{}, {"img_size": 32, "patch_size": 8}])
def test_the_real_deit_file_loads_as_timm_loads_it(args):
    """A regression guard: timm's own adaptation (patch and position embeddings resized) still applies."""
    backbone = create_backbone(DEIT, pretrained_path=str(DEIT_WEIGHTS), **args).eval()
    reference = timm.create_model(DEIT, pretrained=True, num_classes=0, **args,
                                  pretrained_cfg_overlay={"file": str(DEIT_WEIGHTS)}).eval()
    images = torch.randn(2, 3, backbone.data_config.size, backbone.data_config.size)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), reference(images))


@clean_error
def test_a_tensor_of_another_shape_is_named_with_both_shapes(tmp_path):
    path = tiny_weights(tmp_path, change=lambda tensors: tensors.update({"blocks.0.norm1.weight": torch.ones(100)}))
    with pytest.raises(PilotError, match=r"1 tensor\(s\) of another shape: blocks\.0\.norm1\.weight "
                                         r"\(file \(100,\), model \(192,\)\)"):
        create_backbone(TINY, pretrained_path=path, **TINY_VIT)


@clean_error
def test_an_unexpected_tensor_is_refused(tmp_path):
    path = tiny_weights(tmp_path, change=lambda tensors: tensors.update({"blocks.2.norm1.weight": torch.ones(192)}))
    with pytest.raises(PilotError, match=r"1 tensor\(s\) in the file that the backbone lacks: "
                                         r"blocks\.2\.norm1\.weight\."):
        create_backbone(TINY, pretrained_path=path, **TINY_VIT)


@clean_error
def test_only_the_classifier_head_may_be_missing_or_extra(tmp_path):
    def drop_head(tensors):
        del tensors["head.weight"], tensors["head.bias"]

    with_head = features(tiny_weights(tmp_path, "with_head.safetensors"))
    without_head = features(tiny_weights(tmp_path, "without_head.safetensors", drop_head))
    torch.testing.assert_close(with_head, without_head)
    headless_and_short = tiny_weights(tmp_path, "short.safetensors",
                                      lambda tensors: (drop_head(tensors), tensors.pop("norm.bias")))
    with pytest.raises(PilotError, match=r"1 backbone tensor\(s\) missing from the file: norm\.bias\."):
        features(headless_and_short)


@clean_error
def test_an_open_clip_file_must_fit_the_image_tower_only(tmp_path):
    import open_clip

    register_tiny_open_clip(tmp_path)
    tensors = open_clip.create_model("pilot-tiny-clip").state_dict()

    def without(key: str) -> str:
        save_file({k: v for k, v in tensors.items() if k != key}, tmp_path / f"{key}.safetensors")
        return str(tmp_path / f"{key}.safetensors")

    backbone = create_backbone("open_clip:pilot-tiny-clip", pretrained_path=without("text_projection"))
    torch.testing.assert_close(backbone.model.proj, tensors["visual.proj"])
    with pytest.raises(PilotError, match=r"'open_clip:pilot-tiny-clip': 1 backbone tensor\(s\) missing from the file: "
                                         r"visual\.proj\."):
        create_backbone("open_clip:pilot-tiny-clip", pretrained_path=without("visual.proj"))


# --- identity -----------------------------------------------------------------------------------------


@correct_result
def test_backbone_args_are_part_of_the_identity():
    two = create_backbone(TINY, pretrained=False, **TINY_VIT)
    three = create_backbone(TINY, pretrained=False, **{**TINY_VIT, "depth": 3})
    reordered = create_backbone(TINY, pretrained=False, depth=2, patch_size=8, img_size=32)
    assert two.identity != three.identity and two.identity == reordered.identity
    assert '{"depth":2,"img_size":32,"patch_size":8}' in two.identity


def test_a_files_identity_is_its_content_hashed_once_per_version(tmp_path, monkeypatch):
    hashed = []
    sha256_of = digests.sha256_of
    monkeypatch.setattr(digests, "sha256_of", lambda path: hashed.append(path) or sha256_of(path))
    original = tiny_weights(tmp_path, "a.safetensors")
    copy = shutil.copy(original, tmp_path / "b.safetensors")
    identities = [create_backbone(TINY, pretrained_path=str(path), **TINY_VIT).identity
                  for path in (original, original, copy)]
    assert len(set(identities)) == 1 and len(hashed) == 2  # the same content; each file hashed once
    tiny_weights(tmp_path, "a.safetensors", lambda tensors: tensors["norm.weight"].mul_(2))
    changed = create_backbone(TINY, pretrained_path=original, **TINY_VIT).identity
    assert changed != identities[0] and len(hashed) == 3
