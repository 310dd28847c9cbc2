"""tools/lamda_pilot.py: its edits apply to the pinned LAMDA-PILOT export, and its log parser reads PILOT's lines.

No PILOT run here: the export and edits take a second; they skip when the mirror of PILOT's repository
is absent (it is fetched on development machines only).
"""
from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lamda_pilot", ROOT / "tools" / "lamda_pilot.py")
lamda_pilot = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("lamda_pilot", lamda_pilot)  # its dataclass looks its module up
_spec.loader.exec_module(lamda_pilot)

needs_mirror = pytest.mark.skipif(not (lamda_pilot.MIRROR / "HEAD").is_file(),
                                  reason=f"LAMDA-PILOT's mirror is absent ({lamda_pilot.MIRROR})")


@needs_mirror
def test_edits_apply_once_each_to_the_pinned_export(tmp_path):
    src = lamda_pilot.export(lamda_pilot.MIRROR, lamda_pilot.COMMIT, tmp_path / "src")
    before = {edit.file: (src / edit.file).read_text() for edit in lamda_pilot.EDITS}
    assert lamda_pilot.apply_edits(src) == [edit.name for edit in lamda_pilot.EDITS]
    for edit in lamda_pilot.EDITS:
        text = (src / edit.file).read_text()
        assert edit.new in text and (edit.old in edit.new or edit.old not in text), edit.name
    assert all((src / f).read_text() != t for f, t in before.items())
    # A second pass finds nothing to edit: a changed PILOT is refused, not patched silently.
    with pytest.raises(ValueError, match="occurs 0 times in utils/data.py"):
        lamda_pilot.apply_edits(src, lamda_pilot.EDITS[:1])
    # Every learner's P1 config: PILOT's keys, P1's epochs, PILOT's CPU and ViT-Ti backbone.
    for learner in lamda_pilot.LEARNERS:
        config = lamda_pilot.p1_config(src, learner, tmp_path / "data")
        p1 = json.loads((ROOT / "exps" / f"{learner}_p1.json").read_text())
        assert config["device"] == [-1] and config["seed"] == [1993] and config["shuffle"] is True
        assert config["max_tasks"] == 3 and config["train_per_class"] == 50 and config["test_per_class"] == 10
        for key in ("tuned_epoch", "epochs", "init_epochs", "later_epochs", "num_freeze_epochs"):
            if key in p1:
                assert config[key] == p1[key], (learner, key)
        assert "768" not in config["backbone_type"]
        assert config["model_name"] == json.loads((src / "exps" / f"{lamda_pilot.PILOT_EXPS.get(learner, learner)}.json")
                                                  .read_text())["model_name"], learner  # PILOT's factory knows it
    for file in {edit.file for edit in lamda_pilot.EDITS}:  # still valid Python
        compile((src / file).read_text(), file, "exec")
    # What the learners build from ViT-B/16 code is ViT-Ti/16 throughout: no ViT-B width is left in the
    # builders and networks they use (the in21k variants, which no learner here uses, keep theirs).
    for file, names in {"backbone/vit_adapter.py": ["vit_base_patch16_224_adapter"],
                        "backbone/vit_ease.py": ["vit_base_patch16_224_ease"],
                        "backbone/vit_mos.py": ["vit_base_patch16_224_mos"],
                        "backbone/vpt.py": ["build_promptmodel"],
                        "backbone/vit_coda_promtpt.py": ["checkpoint_filter_fn"],
                        "utils/inc_net.py": ["CodaPromptVitNet", "MOSNet", "LAE"],
                        "backbone/linears.py": ["EaseCosineLinear"]}.items():
        text = (src / file).read_text()
        found = {node.name: ast.get_source_segment(text, node) for node in ast.walk(ast.parse(text))
                 if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names}
        assert sorted(found) == sorted(names), file
        for name, code in found.items():
            assert "768" not in code, (file, name)
    backbone = (src / "utils/inc_net.py").read_text().split("def get_backbone", 1)[1].split("\nclass ", 1)[0]
    for branch in ('"vit_tiny_patch16_224",pretrained=True', '"vit_tiny_patch16_224_ssf"',
                   'basicmodelname = "vit_tiny_patch16_224"', "ffn_num=ffn_num,\n                d_model=192"):
        assert branch in backbone, branch
    assert backbone.count("d_model=192") == 3 and backbone.count("d_model=768") == 0  # adapter, EASE, MOS
    assert "embed_dim=192, num_heads=3" in (src / "backbone/vpt.py").read_text()  # VPT_ViT's defaults are ViT-B's
    coda = (src / "backbone/vit_coda_promtpt.py").read_text()
    assert "prompt_loss += " not in coda and "k.startswith('head.')" in coda


def test_vit_ti_loader_edit_keeps_the_code_and_changes_the_layout():
    edit = lamda_pilot.vit_ti_loader("x", "f.py", "vit_base_patch16_224_x",
                                     'checkpoint_model=timm.create_model("vit_base_patch16_224", pretrained=True)')
    assert "768" not in edit.new and "embed_dim=192, depth=12, num_heads=3" in edit.new
    assert 'timm.create_model("vit_tiny_patch16_224", pretrained=True)' in edit.new
    assert "qkv_weight[:192]" in edit.new and "qkv_weight[192:192*2]" in edit.new and "qkv_bias[192*2:]" in edit.new
    # line for line the same code apart from the widths, the heads, the weights' name and one comment
    assert len(edit.old.splitlines()) == len(edit.new.splitlines())


def test_parser_reads_pilots_curve_lines():
    log = ("2026-12-07 02:20:01,123 [trainer.py] => CNN top1 curve: [87.0]\n"
           "2026-12-07 02:21:01,123 [trainer.py] => CNN top1 curve: [np.float64(87.0), np.float64(80.5), 77.67]\n"
           "2026-12-07 02:21:01,124 [trainer.py] => CNN top5 curve: [np.float64(99.0), np.float64(97.0)]\n")
    assert lamda_pilot.parse_log(log) == {"cnn": [87.0, 80.5, 77.67], "nme": None}
    log += "2026-12-07 02:21:01,125 [trainer.py] => NME top1 curve: [86.0, 79.0]\n"
    assert lamda_pilot.parse_log(log)["nme"] == [86.0, 79.0]


def test_time_parser():
    stderr = ("\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:02:03.5\n"
              "\tMaximum resident set size (kbytes): 2097152\n")
    assert lamda_pilot.parse_time(stderr) == {"wall_s": 3723.5, "peak_rss_gib": 2.0}


@needs_mirror
@pytest.mark.parametrize("name", sorted(lamda_pilot.ABLATIONS))
def test_each_ablation_applies_after_the_edits(tmp_path, name):
    src = lamda_pilot.export(lamda_pilot.MIRROR, lamda_pilot.COMMIT, tmp_path / "src")
    lamda_pilot.apply_edits(src)
    assert lamda_pilot.apply_edits(src, lamda_pilot.ABLATIONS[name]) == [e.name for e in lamda_pilot.ABLATIONS[name]]
    for edit in lamda_pilot.ABLATIONS[name]:  # still valid Python
        compile((src / edit.file).read_text(), edit.file, "exec")
