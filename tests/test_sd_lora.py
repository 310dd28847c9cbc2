"""SD-LoRA: frozen normalised directions with trained magnitudes, rank reduction, resume (tiny random ViT)."""
import pytest
import torch
import torch.nn.functional as F

from pilot.configure import build_config
from pilot.engine import Run, run_experiment

from conftest import assert_resume_matches_uninterrupted, real_raw, requires_assets, tiny_raw


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


@pytest.mark.parametrize("overrides, message", [
    ({"rank": 0}, "rank must be a positive integer"),
    ({"rank_reduction": [[2, 4], [1, 2]]}, "rank_reduction must list"),
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
