"""ESN: isolated task heads over a prompted frozen ViT, combined by an energy vote (pilot.modules.energy)."""
import math

import numpy as np
import pytest
import torch

from pilot.configure import build_config
from pilot.data.stream import Split
from pilot.engine import Run, run_experiment
from pilot.errors import PilotError
from pilot.modules.energy import EnergyVote, energy_alignment_loss, free_energy, head_energies

from conftest import killed_then_resumed, real_raw, requires_assets, run_recording_each_task, tiny_raw


def esn_config(tmp_path, **overrides):
    settings = {"tuned_epoch": 1, "batch_size": 8, "prompt_length": 4, "head_num_heads": 3, "max_tasks": 3,
                "train_per_class": 4, "test_per_class": 2, **overrides}
    return build_config(tiny_raw(tmp_path, model_name="esn", **settings))


def logsumexp(values, temperature):
    top = max(values) / temperature
    return top + math.log(sum(math.exp(v / temperature - top) for v in values))


# Three heads' logits for one image: head 0 has one high logit, head 1 several nearly as high, head 2 low ones.
HEADS = [[2.0, 0.0, 0.0], [1.9, 1.95, 1.85], [1.0, 1.0, 1.0]]


def test_vote_equals_the_hand_computation():
    vote = EnergyVote(candidates=(0.001, 0.5, 1.0))
    vote.selected = [0.001, 0.5, 1.0, 0.5]  # a temperature selected twice votes once
    # by hand: at T = 0.001 the largest logit decides (head 0: 2.0 / T); at 0.5 and 1.0 the mass of head 1 wins
    winners = [max(range(3), key=lambda h: logsumexp(HEADS[h], t)) for t in (0.001, 0.5, 1.0)]
    assert winners == [0, 1, 1]
    head_logits = [torch.tensor([logits]) for logits in HEADS]
    energies = head_energies(head_logits, (0.001, 0.5, 1.0))
    expected = [[logsumexp(HEADS[h], t) for t in (0.001, 0.5, 1.0)] for h in range(3)]
    torch.testing.assert_close(energies, torch.tensor([expected]), rtol=1e-5, atol=1e-4)
    assert vote.vote(head_logits).tolist() == [1]
    vote.selected = [0.001]
    assert vote.vote(head_logits).tolist() == [0]
    vote.selected = [0.001, 1.0]  # a tie between heads 0 and 1: the smaller, as torch.mode
    assert vote.vote(head_logits).tolist() == [0]


def test_the_prediction_is_the_voted_heads_argmax(tmp_path):
    learner = Run(esn_config(tmp_path)).learner
    learner.head_classes = [(0, 3), (3, 6), (6, 9)]
    learner.vote.selected = [0.001, 0.5, 1.0]
    learner.all_head_logits = lambda images: [torch.tensor([logits, logits[::-1]]) for logits in HEADS]
    logits = learner.eval_logits(torch.zeros(2, 3, 32, 32), None)
    # image 0: head 1 by the vote, its class 1 -> 4; image 1 (reversed logits): head 1 again, its class 1 -> 4
    assert logits.argmax(1).tolist() == [4, 4]
    for start, stop in learner.head_classes:  # within a task, the order is that task's head's
        assert torch.equal(logits[0, start:stop].argsort(), torch.tensor(HEADS[start // 3]).argsort())


def test_temperature_selection_separates_the_new_task_best():
    vote = EnergyVote(candidates=(0.1, 1.0, 10.0))
    assert vote.select(None, 0) == 0.001
    # energies [images, heads, candidates]: head 1 has the largest energy for 1/3, 3/3, 3/3 images
    energies = torch.tensor([
        [[5.0, 1.0, 1.0], [4.0, 2.0, 2.0]],
        [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]],
        [[3.0, 1.0, 0.0], [1.0, 2.0, 3.0]],
    ])
    assert vote.select(energies, 1) == 1.0  # first of the best, as np.argmax
    assert vote.temperatures == [0.001, 1.0]


def test_energy_alignment_is_the_official_formula():
    logits = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    beta, anchor = 2.0, -10.0
    energies = [-math.log(sum(math.exp(-beta * v) for v in row)) / beta for row in logits.tolist()]
    torch.testing.assert_close(free_energy(logits, beta), torch.tensor(energies))
    expected = sum((e - anchor) ** 2 for e in energies) / 2
    torch.testing.assert_close(energy_alignment_loss(logits, anchor, beta), torch.tensor(expected))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """An ESN run through 3 tasks: the backbone before, the heads after each task."""
    run = Run(esn_config(tmp_path_factory.mktemp("esn")))
    return (run, *run_recording_each_task(run))


def test_backbone_stays_bit_identical_old_heads_stay_and_prompts_go_on_training(trained_run):
    run, before, after_task, _ = trained_run
    after = run.ctx.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "frozen ViT weights changed"
    head0 = [k for k in after_task[0] if k.startswith("heads.0.")]
    assert all(torch.equal(after_task[0][k], after_task[2][k]) for k in head0)
    assert not torch.equal(after_task[0]["prompt.weight"], after_task[2]["prompt.weight"])
    assert len(run.learner.vote.selected) == 3 and run.learner.vote.selected[0] == 0.001


def test_predictions_do_not_depend_on_the_batch(trained_run):
    run, _, _, _ = trained_run
    parts = [task.test for task in run.stream.tasks]
    order = np.random.RandomState(0).permutation(sum(len(p) for p in parts))
    mixed = Split("test", parts[0].source, np.concatenate([p.indices for p in parts])[order],
                  np.concatenate([p.labels for p in parts])[order])
    run.ctx.experiment.eval_batch_size = 7
    in_sevens = run.learner.predict(mixed)
    run.ctx.experiment.eval_batch_size = 64
    torch.testing.assert_close(in_sevens, run.learner.predict(mixed), rtol=1e-4, atol=1e-4)


def test_resume_matches_an_uninterrupted_run(trained_run, tmp_path):
    uninterrupted = trained_run[3]
    resumed = killed_then_resumed(esn_config(tmp_path))
    assert resumed["counts"] == uninterrupted["counts"]
    assert resumed["accuracy_curve"] == uninterrupted["accuracy_curve"]


def test_runs_a_domain_stream_with_a_head_per_domain(tmp_path):
    (result,) = run_experiment(esn_config(tmp_path, dataset="synthetic_domains", scenario="domain", synthetic_classes=4,
                                          synthetic_per_class=4, synthetic_domains=2, max_tasks=2))
    assert result["status"] == "complete" and len(result["accuracy_curve"]) == 2


@pytest.mark.parametrize("overrides, message", [
    ({"head_num_heads": 5}, r"head_num_heads \(5\) must divide the backbone's width \(192\)"),
    ({"temperatures": []}, r"temperatures must be a non-empty list of positive numbers"),
    ({"prompt_length": -1}, r"prompt_length must be >= 0"),
])
def test_bad_settings_are_clear_errors(tmp_path, overrides, message):
    with pytest.raises(PilotError, match=message):
        Run(esn_config(tmp_path, **overrides))


@pytest.mark.slow
@requires_assets
def test_real_deit_tiny_smoke(tmp_path):
    """Real weights and images through the whole path; accuracy is measured on protocol P1 (docs/benchmarks.md)."""
    run = Run(build_config(real_raw(tmp_path, model_name="esn", train_per_class=2, test_per_class=2, max_tasks=2,
                                    tuned_epoch=1, batch_size=10, prompt_length=10)))
    weights = {k: v.clone() for k, v in run.ctx.backbone.state_dict().items()}
    result = run.execute()
    assert result["completed_tasks"] == 2 and len(run.learner.vote.selected) == 2
    assert all(torch.equal(v, run.ctx.backbone.state_dict()[k]) for k, v in weights.items())
