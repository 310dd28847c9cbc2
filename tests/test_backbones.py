import json
import socket
import time

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


def empty_hub_cache(monkeypatch, tmp_path):
    """The hub's cache, read when a download is asked for: empty, so no weights come from a cached copy."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def test_weights_missing_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty_hub_cache(monkeypatch, tmp_path)
    with pytest.raises(PilotError, match=r"Could not load weights for 'vit_tiny_patch16_224'.*pretrained_path"):
        create_backbone("vit_tiny_patch16_224", pretrained=True, **TINY_VIT)


@pytest.mark.parametrize("unreachable", ["HF_HUB_OFFLINE", "no connection"])
def test_weights_with_the_hub_out_of_reach_fail_at_once_naming_the_local_file(monkeypatch, tmp_path, unreachable):
    """PILOT's headline backbone offline: one connection attempt (or HF_HUB_OFFLINE), not the hub's retries, and
    the file that weights_dir should hold."""
    empty_hub_cache(monkeypatch, tmp_path)
    if unreachable == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        import huggingface_hub.constants

        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        attempts = []

        def refuse(address, *args, **kwargs):
            attempts.append(address)
            raise OSError("Network is unreachable")

        monkeypatch.setattr(socket, "create_connection", refuse)
    started = time.perf_counter()
    with pytest.raises(PilotError) as raised:
        create_backbone("pretrained_vit_b16_224", weights_dir=str(tmp_path / "weights"), **TINY_VIT)
    assert time.perf_counter() - started < 10
    message = str(raised.value)
    assert f"'{tmp_path / 'weights' / 'vit_base_patch16_224.augreg_in21k_ft_in1k.safetensors'}'" in message
    assert "PILOT_WEIGHTS_DIR" in message and "cannot be reached" in message and "pretrained_path" in message
    if unreachable == "no connection":
        assert len(attempts) == 1


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
    with pytest.raises(PilotError, match="no pretrained tag 'no-such-tag'"):
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
