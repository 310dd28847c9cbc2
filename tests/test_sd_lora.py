"""SD-LoRA: frozen normalised directions with trained magnitudes, rank reduction, SD-LoRA-KD's least-squares
absorption, resume (tiny random ViT)."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pilot.configure import build_config, load_config
from pilot.engine import Run, run_experiment
from pilot.modules.lora import fit_last_direction

from conftest import assert_resume_matches_uninterrupted, killed_then_resumed, real_raw, requires_assets, tiny_raw

EXPS = Path(__file__).resolve().parents[1] / "exps"


def sd_lora_raw(tmp_path, **overrides) -> dict:
    raw = tiny_raw(tmp_path, model_name="sd_lora", tuned_epoch=1, batch_size=16, rank=3, max_tasks=3, train_per_class=4)
    raw.update(overrides)
    return raw


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    """A learner after task 1 (its pair and magnitudes then), after task 2, and the ViT's weights at the start."""
    run = Run(build_config(sd_lora_raw(tmp_path_factory.mktemp("sd_lora"), batch_size=4)))  # task 2: two steps
    learner, tasks = run.learner, run.stream.tasks
    vit_weights = {k: v.clone() for k, v in run.ctx.backbone.state_dict().items()}
    learner.fit(tasks[0])
    first_pair = [p.detach().clone() for p in learner.net["lora"].pair_parameters(0)]
    learner.fit(tasks[1])
    return run, learner, vit_weights, first_pair


def test_earlier_directions_stay_bit_identical_while_their_magnitudes_train(two_tasks):
    _, learner, _, first_pair = two_tasks
    lora = learner.net["lora"]
    assert all(torch.equal(a, b) for a, b in zip(first_pair, lora.pair_parameters(0)))
    assert lora.normalised == [True, False]
    magnitudes = [float(m.detach()) for m in lora.magnitudes]
    assert all(m != pytest.approx(0.8, abs=1e-7) for m in magnitudes), "both magnitudes moved from their 0.8 start (the new one from the second step, once B != 0)"
    assert all(float(up.abs().sum()) > 0 for up in lora.pair_parameters(1, ("up",)))


def test_the_query_and_value_slices_follow_the_decoupled_formula(two_tasks):
    run, learner, _, _ = two_tasks
    lora, stock = learner.net["lora"], run.ctx.backbone.model.blocks[0].attn.qkv
    x = torch.randn(2, 5, 192)
    expected = F.linear(x, stock.weight, stock.bias)
    (old_magnitude, magnitude) = lora.magnitudes
    for name, start in (("q", 0), ("v", 384)):
        old, new = lora.units[0].pairs[0][name], lora.units[0].pairs[1][name]
        direction = old.up @ old.down / (torch.linalg.norm(old.up) * torch.linalg.norm(old.down))
        expected[..., start:start + 192] += x @ (old_magnitude * direction + magnitude * new.up @ new.down).T
    with torch.no_grad():
        torch.testing.assert_close(stock(x), expected, rtol=1e-5, atol=1e-5)
        with lora.disabled():
            assert torch.equal(stock(x), F.linear(x, stock.weight, stock.bias))


def test_the_backbone_stays_bit_identical(two_tasks):
    run, _, vit_weights, _ = two_tasks
    assert all(torch.equal(v, run.ctx.backbone.state_dict()[k]) for k, v in vit_weights.items())


def test_every_magnitude_restarts_at_its_init_when_a_task_begins(two_tasks):
    run, learner, _, _ = two_tasks  # the last of this fixture's tests: it starts task 3
    learner.begin_task(run.stream.tasks[2])
    assert [float(m.detach()) for m in learner.net["lora"].magnitudes] == pytest.approx([0.8, 0.8, 0.8])
    assert learner.net["lora"].normalised == [True, True, False]
    trained = {id(p) for p in learner.trainable()}
    assert all(id(m) in trained for m in learner.net["lora"].magnitudes)
    assert not any(p.requires_grad for p in learner.net["lora"].pair_parameters(1))


def test_rank_reduction_gives_later_tasks_smaller_pairs(tmp_path):
    run = Run(build_config(sd_lora_raw(tmp_path, model_name="sd_lora_rr", rank_reduction=[[1, 2], [2, 1]])))
    assert [run.learner.rank_of(task) for task in run.stream.tasks] == [3, 2, 1]
    assert Run(build_config(sd_lora_raw(tmp_path / "rr", model_name="sd_lora_rr", rank=10))).learner.config.rank_reduction \
        == [[4, 8], [8, 6]]


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    uninterrupted, _ = assert_resume_matches_uninterrupted(
        lambda folder: build_config(sd_lora_raw(tmp_path / folder, model_name="sd_lora_rr", rank_reduction=[[1, 2]])))
    assert uninterrupted["status"] == "complete" and len(uninterrupted["accuracy_curve"]) == 3


def test_direction_gram_and_fit_match_dense_least_squares(tmp_path):
    """The Gram matrix from the low-rank factors = inner products of the dense normalised directions (every block
    and slice stacked), and the fit = torch's least squares on them, residual included."""
    lora = Run(build_config(sd_lora_raw(tmp_path, model_name="sd_lora_kd"))).learner.net["lora"]
    torch.manual_seed(0)
    for rank in (3, 2, 3):
        lora.add_pair(rank)
    with torch.no_grad():
        for up in lora.pair_parameters(1, ("up",)) + lora.pair_parameters(2, ("up",)):
            up.normal_()
        lora.pair_parameters(0, ("up",))[0].normal_()  # pair 0: zero in all but one block and slice
    dense = torch.stack([torch.cat([(p.up @ p.down / (p.norm_product() or 1)).flatten()
                                    for unit in lora.units for p in (unit.pairs[k][name] for name in lora.slices)])
                         for k in range(3)]).double().detach()
    torch.testing.assert_close(lora.direction_gram(), dense @ dense.T)
    coefficients, residual = fit_last_direction(lora.direction_gram())
    expected = torch.linalg.lstsq(dense[:2].T, dense[2:].T).solution.squeeze(1)
    torch.testing.assert_close(coefficients, expected)
    assert residual == pytest.approx(float(torch.linalg.norm(dense[2] - expected @ dense[:2])), rel=1e-9)


def set_rank_one_pair(lora, index, ups, downs, scale_up=1.0, scale_down=1.0):
    """Pair ``index`` of every block and slice to ``up = scale_up * ups[m]``, ``down = scale_down * downs[m]^T``."""
    with torch.no_grad():
        for m, pair in enumerate(p for unit in lora.units for p in (unit.pairs[index][name] for name in lora.slices)):
            pair.up.copy_(scale_up * ups[m].unsqueeze(1))
            pair.down.copy_(scale_down * downs[m].unsqueeze(0))


def test_kd_absorbs_a_combination_of_earlier_directions_and_keeps_a_new_one(tmp_path):
    """Hand-set rank-1 pairs, in every block and slice, of one unit vector a (down) and orthonormal b0, b1, b2 (up):
    pair 1 along b1 is no combination of pair 0 (b0) and stays; pair 2 along 3 b0 - 2 b1 is one, with coefficients
    (3, -2)/sqrt(13) (Eq. 7): it is dropped and the magnitudes become a_k + da_k (Eq. 8), which the qkv output
    follows; at the next task they restart at 0.8 + da_k."""
    run = Run(build_config(sd_lora_raw(tmp_path, model_name="sd_lora_kd", rank=1, max_tasks=4)))
    learner, tasks, lora = run.learner, run.stream.tasks, run.learner.net["lora"]
    assert learner.config.kd_threshold == 9e-4
    torch.manual_seed(0)
    bases = [torch.linalg.qr(torch.randn(192, 4))[0] for _ in range(4)]  # 2 blocks x (q, v)
    downs = [basis[:, 3] for basis in bases]
    b0, b1, b2 = ([basis[:, i] for basis in bases] for i in range(3))

    def end_with_magnitudes(task, values):
        with torch.no_grad():
            for magnitude, value in zip(lora.magnitudes, values):
                magnitude.fill_(value)
        learner.end_task(task)

    learner.begin_task(tasks[0])
    set_rank_one_pair(lora, 0, b0, downs, 2.0, 5.0)
    end_with_magnitudes(tasks[0], [0.5])
    learner.begin_task(tasks[1])
    set_rank_one_pair(lora, 1, b1, downs, 0.3)
    assert fit_last_direction(lora.direction_gram())[1] == pytest.approx(2.0)  # ||b1 a^T|| = 1 in 4 matrices
    end_with_magnitudes(tasks[1], [0.5, 1.3])
    assert len(lora) == 2 and learner.absorbed == [0.0, 0.0]

    learner.begin_task(tasks[2])
    assert [float(m.detach()) for m in lora.magnitudes] == pytest.approx([0.8, 0.8, 0.8])
    set_rank_one_pair(lora, 2, [x + y for x, y in zip(b0, b2)], downs)
    coefficients, residual = fit_last_direction(lora.direction_gram())
    torch.testing.assert_close(coefficients, torch.tensor([0.5 ** 0.5, 0.0], dtype=torch.float64), atol=1e-6, rtol=0)
    assert residual == pytest.approx(2 ** 0.5)  # b2 a^T / sqrt(2) left in each of the 4 matrices
    set_rank_one_pair(lora, 2, [3 * x - 2 * y for x, y in zip(b0, b1)], downs, 0.7, 4.0)
    end_with_magnitudes(tasks[2], [0.6, 1.1, 0.9])
    shift = [3 / 13 ** 0.5, -2 / 13 ** 0.5]
    assert len(lora) == 2 and lora.normalised == [True, True]
    assert [float(m.detach()) for m in lora.magnitudes] == pytest.approx([0.6 + shift[0], 1.1 + shift[1]])
    assert learner.absorbed == pytest.approx(shift)

    stock, x = run.ctx.backbone.model.blocks[1].attn.qkv, torch.randn(2, 5, 192)
    expected = F.linear(x, stock.weight, stock.bias)
    for m, (name, start) in enumerate((("q", 0), ("v", 384)), start=2):  # block 1's matrices: 2 (q) and 3 (v)
        delta = (0.6 + shift[0]) * torch.outer(b0[m], downs[m]) + (1.1 + shift[1]) * torch.outer(b1[m], downs[m])
        expected[..., start:start + 192] += x @ delta.T
    with torch.no_grad():
        torch.testing.assert_close(stock(x), expected, rtol=1e-5, atol=1e-5)

    learner.begin_task(tasks[3])
    assert [float(m.detach()) for m in lora.magnitudes] == pytest.approx([0.8 + shift[0], 0.8 + shift[1], 0.8])
    trained = {id(p) for p in learner.trainable()}
    assert all(id(p) in trained for p in lora.pair_parameters(2))


def test_kd_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    """A threshold that absorbs every new direction: one pair is left, and a run killed after task 2's absorption
    (kept in the checkpoint) and resumed gives the uninterrupted run's counts and curve."""
    def make(folder):
        return build_config(sd_lora_raw(tmp_path / folder, model_name="sd_lora_kd", kd_threshold=100.0))

    run = Run(make("full").for_seed(1))
    uninterrupted = run.execute()
    assert len(run.learner.net["lora"]) == 1 and run.learner.absorbed[0] != 0
    resumed = killed_then_resumed(make("killed"), kill_before_task=2)
    assert resumed["counts"] == uninterrupted["counts"]
    assert resumed["accuracy_curve"] == uninterrupted["accuracy_curve"] and len(resumed["accuracy_curve"]) == 3


def test_kd_configs_hold_the_papers_threshold():
    for name in ("sd_lora_kd", "sd_lora_kd_p1"):
        config = load_config(EXPS / f"{name}.json")
        assert config.experiment.model_name == "sd_lora_kd" and config.learner.kd_threshold == 9e-4


@pytest.mark.parametrize("overrides, message", [
    ({"rank": 0}, "rank must be a positive integer"),
    ({"rank_reduction": [[2, 4], [1, 2]]}, "rank_reduction must list"),
    ({"model_name": "sd_lora_kd", "kd_threshold": -1.0}, "kd_threshold must be a number >= 0"),
])
def test_bad_settings_are_clear_errors(tmp_path, overrides, message):
    with pytest.raises(Exception, match=message):
        Run(build_config(sd_lora_raw(tmp_path, **overrides)))


@pytest.mark.slow
@requires_assets
def test_real_deit_tiny_smoke(tmp_path):
    """Real weights and images through the decoupled LoRA (P1 measures accuracy)."""
    (result,) = run_experiment(build_config(real_raw(
        tmp_path, model_name="sd_lora", train_per_class=2, test_per_class=1, max_tasks=2, tuned_epoch=1, batch_size=10)))
    assert result["status"] == "complete" and len(result["accuracy_curve"]) == 2
