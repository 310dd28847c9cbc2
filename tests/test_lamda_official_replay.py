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
