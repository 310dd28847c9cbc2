import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from pilot.backbones import create_backbone, resolve_backbone_name
from pilot.digests import sha256_of
from pilot.errors import PilotError

from conftest import TINY_VIT


def test_pilot_names_map_to_timm():
    assert resolve_backbone_name("pretrained_vit_b16_224") == "vit_base_patch16_224.augreg_in21k_ft_in1k"
    assert resolve_backbone_name("vit_base_patch16_224_in21k_adapter") == "vit_base_patch16_224.augreg_in21k"
    assert resolve_backbone_name("deit_tiny_patch16_224") == "deit_tiny_patch16_224"


def test_unknown_backbone_suggests_timm_names():
    with pytest.raises(PilotError, match=r"Unknown backbone 'deit_tiny_patch16_2244'.*deit_tiny_patch16_224"):
        create_backbone("deit_tiny_patch16_2244", pretrained=False)


def test_random_timm_backbone_features_and_input_size():
    backbone = create_backbone("vit_tiny_patch16_224", pretrained=False, **TINY_VIT)
    assert backbone.data_config.size == 32 and backbone.feature_dim == 192
    assert backbone(torch.zeros(2, 3, 32, 32)).shape == (2, 192)


def test_weights_missing_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(PilotError, match=r"Could not load weights for 'vit_tiny_patch16_224'.*pretrained_path"):
        create_backbone("vit_tiny_patch16_224", pretrained=True, **TINY_VIT)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(PilotError, match="does not exist"):
        create_backbone("vit_tiny_patch16_224", pretrained_path=str(tmp_path / "w.safetensors"))


def test_local_weights_file_and_weights_dir(tmp_path):
    torch.manual_seed(0)
    source = create_backbone("vit_tiny_patch16_224", pretrained=False, **TINY_VIT)
    save_file(source.model.state_dict(), tmp_path / "vit_tiny_patch16_224.safetensors")
    images = torch.randn(2, 3, 32, 32)
    expected = source.eval()(images)
    by_path = create_backbone("vit_tiny_patch16_224", pretrained_path=str(tmp_path / "vit_tiny_patch16_224.safetensors"), **TINY_VIT)
    by_dir = create_backbone("vit_tiny_patch16_224", weights_dir=str(tmp_path), **TINY_VIT)
    torch.testing.assert_close(by_path.eval()(images), expected)
    torch.testing.assert_close(by_dir.eval()(images), expected)
    assert by_path.identity == by_dir.identity and "sha256" in by_path.identity


def register_tiny_open_clip(tmp_path):
    import open_clip

    config = {"embed_dim": 32,
              "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
              "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "pilot-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "pilot-tiny-clip.json")


def test_open_clip_random_image_encoder(tmp_path):
    register_tiny_open_clip(tmp_path)
    backbone = create_backbone("open_clip:pilot-tiny-clip", pretrained=False)
    assert backbone.feature_dim == 32 and backbone.data_config.size == 32
    assert backbone.data_config.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert backbone(torch.zeros(3, 3, 32, 32)).shape == (3, 32)


def test_open_clip_errors(tmp_path, monkeypatch):
    with pytest.raises(PilotError, match="Unknown open_clip model 'ViT-Q-99'"):
        create_backbone("open_clip:ViT-Q-99", pretrained=False)
    register_tiny_open_clip(tmp_path)
    with pytest.raises(PilotError, match="needs a pretrained tag"):
        create_backbone("open_clip:pilot-tiny-clip", pretrained=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PilotError, match="Could not load open_clip weights"):
        create_backbone("open_clip:pilot-tiny-clip:no-such-tag", pretrained=True)


def test_a_local_weights_file_keeps_the_users_pretrained_cfg_overlay(tmp_path):
    tiny = {"img_size": 32, "patch_size": 8, "depth": 2}
    path = tmp_path / "tiny.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, **tiny).state_dict(), path)
    overlay = {"crop_pct": 1.0, "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6), "interpolation": "bilinear"}
    backbone = create_backbone("vit_tiny_patch16_224", True, str(path), None, 0, pretrained_cfg_overlay=overlay, **tiny)
    config = backbone.data_config
    assert (config.crop_pct, config.mean, config.std, config.interpolation) == (1.0, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6),
                                                                                "bilinear")
    assert backbone.identity.endswith(f"file-sha256:{sha256_of(path)}")
