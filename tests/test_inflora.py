"""InfLoRA: subspace-constrained down-projections, DualGPM bases, a frozen backbone, resume (tiny random ViT)."""
import math

import pytest
import torch

from pilot.configure import build_config
from pilot.engine import Run, run_experiment
from pilot.learners._gradient import make_scheduler
from pilot.learners.inflora import DualGPM

from conftest import assert_resume_matches_uninterrupted, real_raw, requires_assets, tiny_raw


def inflora_raw(tmp_path, **overrides) -> dict:
    raw = tiny_raw(tmp_path, model_name="inflora", tuned_epoch=1, batch_size=16, rank=3, max_tasks=3, train_per_class=4)
    raw.update(overrides)
    return raw


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    """A learner after task 1, the old-task projectors its bases gave then, and the same after task 2."""
    run = Run(build_config(inflora_raw(tmp_path_factory.mktemp("inflora"))))
    learner, tasks = run.learner, run.stream.tasks
    vit_weights = {k: v.clone() for k, v in run.ctx.backbone.state_dict().items()}
    learner.fit(tasks[0])
    first_pair = [p.detach().clone() for p in learner.net["lora"].pair_parameters(0)]
    projectors = [learner.subspaces.old_projector(block) for block in range(len(learner.subspaces.bases))]
    learner.fit(tasks[1])
    return run, learner, vit_weights, first_pair, projectors


def test_the_new_down_projection_is_orthogonal_to_the_old_tasks_subspace(two_tasks):
    _, learner, _, _, projectors = two_tasks
    lora = learner.net["lora"]
    for name in ("k", "v"):
        for block, pair in enumerate(lora.pair(1, name)):
            down = pair.down.double()
            assert float((down @ projectors[block]).abs().max()) < 1e-5
            # rows: orthonormal singular vectors / sqrt(3)
            torch.testing.assert_close(down @ down.T, torch.eye(3, dtype=torch.float64) / 3, atol=1e-6, rtol=0)
    assert all(torch.equal(k.down, v.down) for k, v in zip(lora.pair(1, "k"), lora.pair(1, "v")))


def test_only_the_current_up_projections_and_head_train(two_tasks):
    run, learner, vit_weights, first_pair, _ = two_tasks
    lora = learner.net["lora"]
    assert all(torch.equal(a, b) for a, b in zip(first_pair, lora.pair_parameters(0)))
    assert all(float(up.abs().sum()) > 0 for up in lora.pair_parameters(1, ("up",)))
    assert all(torch.equal(v, run.ctx.backbone.state_dict()[k]) for k, v in vit_weights.items())
    assert not any(p.requires_grad for p in run.ctx.backbone.parameters())


def test_dualgpm_keeps_the_directions_holding_the_threshold_of_the_energy():
    torch.manual_seed(0)
    rotation = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0]
    energy = torch.tensor([40.0, 30.0, 20.0, 6.0, 2.0, 1.0, 0.6, 0.4], dtype=torch.float64)  # sums to 100
    matrix = rotation @ torch.diag(energy.sqrt()) @ rotation.T
    gpm = DualGPM()
    gpm.update([matrix], threshold=0.95)  # cumulative 0.40, 0.70, 0.90, 0.96: three below 0.95
    torch.testing.assert_close(gpm.old_projector(0), rotation[:, :3] @ rotation[:, :3].T)
    assert gpm.kinds == ["remove"]
    # the next task brings the rest: the subspace grows past half the space and is kept as its complement
    def energies(*values):
        return rotation @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ rotation.T

    gpm.update([energies(0, 0, 0, 32, 32, 32, 2, 2)], threshold=0.95)  # 0.32, 0.64, 0.96: three more
    assert gpm.kinds == ["retain"] and gpm.bases[0].shape[1] == 2
    torch.testing.assert_close(gpm.old_projector(0), rotation[:, :6] @ rotation[:, :6].T)
    gpm.update([energies(0, 0, 0, 0, 0, 0, 10, 0)], threshold=0.95)  # one new direction leaves the complement
    assert gpm.kinds == ["retain"] and gpm.bases[0].shape[1] == 1
    torch.testing.assert_close(gpm.old_projector(0), rotation[:, :7] @ rotation[:, :7].T)


def test_the_threshold_moves_linearly_from_lamb_to_lame(tmp_path):
    run = Run(build_config(inflora_raw(tmp_path, lamb=0.9, lame=0.98)))
    # 4 planned tasks (max_tasks stops at 3): task t of T at lamb + (lame - lamb) t / T
    assert [run.learner.threshold(task) for task in run.stream.tasks] == pytest.approx([0.9, 0.92, 0.94])


def test_adam_follows_the_official_cosine_schedule(tmp_path):
    run = Run(build_config(inflora_raw(tmp_path, tuned_epoch=5)))
    assert run.learner.cosine_schedule == "inflora_cosine"
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = make_scheduler(optimizer, run.learner.config, run.learner.cosine_schedule)
    rates = []
    for _ in range(5):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([math.cos(99 * math.pi * e / 800) for e in range(5)])


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    uninterrupted, _ = assert_resume_matches_uninterrupted(lambda folder: build_config(inflora_raw(tmp_path / folder)))
    assert uninterrupted["status"] == "complete" and len(uninterrupted["accuracy_curve"]) == 3


@pytest.mark.parametrize("overrides, message", [
    ({"rank": 0}, "rank must be a positive integer"),
    ({"lamb": 1.5}, r"lamb \(1.5\) and lame \(1.0\) are energy thresholds"),
])
def test_bad_settings_are_clear_errors(tmp_path, overrides, message):
    with pytest.raises(Exception, match=message):
        Run(build_config(inflora_raw(tmp_path, **overrides)))


@pytest.mark.slow
@requires_assets
def test_real_deit_tiny_smoke(tmp_path):
    """Real weights and images through the recorded inputs, subspace init and training (P1 measures accuracy)."""
    (result,) = run_experiment(build_config(real_raw(
        tmp_path, model_name="inflora", train_per_class=2, test_per_class=1, max_tasks=2, tuned_epoch=1, batch_size=10)))
    assert result["status"] == "complete" and len(result["accuracy_curve"]) == 2
