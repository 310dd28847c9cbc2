"""EASE: one adapter (subspace) per task, complemented prototypes, reweighted subspace ensemble."""
import torch
import torch.nn.functional as F

from pilot.configure import build_config
from pilot.engine import Run
from pilot.modules.heads import SubspacePrototypes

from conftest import assert_resume_matches_uninterrupted, tiny_raw

TASKS = [range(0, 2), range(2, 4), range(4, 5)]


def ease_config(tmp_path, **overrides):
    return build_config(tiny_raw(tmp_path, **{"model_name": "ease", "init_epochs": 1, "batch_size": 8, **overrides}))


def hand_built(seed: int = 0) -> SubspacePrototypes:
    """5 classes in 3 tasks; class c has real prototypes in subspaces 0..task(c) (what EASE fills)."""
    prototypes = SubspacePrototypes(4)
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(5, 3, 4, generator=generator)
    for task, classes in enumerate(TASKS):
        weights[classes.start:classes.stop, task + 1:] = 0
    prototypes.weights = weights
    return prototypes


def test_complemented_prototypes_equal_the_formula():
    prototypes = hand_built()
    real = prototypes.weights.clone()
    prototypes.complement(TASKS, first=0, recalc=True)
    w = prototypes.weights
    for old in range(2):
        for later in range(old + 1, 3):
            references = range(TASKS[later].start, 5)
            expected = []
            for c in TASKS[old]:  # row by row: softmax over the references of cos(own prototype, theirs)
                cos = torch.stack([F.cosine_similarity(real[c, old], real[r, old], dim=0) for r in references])
                weights = cos.exp() / cos.exp().sum()
                expected.append(sum(weight * real[r, later] for weight, r in zip(weights, references)))
            torch.testing.assert_close(w[TASKS[old].start:TASKS[old].stop, later], torch.stack(expected))
    for task, classes in enumerate(TASKS):  # real prototypes are never touched
        torch.testing.assert_close(w[classes.start:classes.stop, : task + 1], real[classes.start:classes.stop, : task + 1])


def test_without_recalc_only_the_newest_subspace_is_filled():
    prototypes = hand_built()
    prototypes.weights[0:2, 1] = 7.0  # a block filled at an earlier task
    prototypes.complement(TASKS, first=0, recalc=False)
    assert torch.equal(prototypes.weights[0:2, 1], torch.full((2, 4), 7.0))
    assert prototypes.weights[0:4, 2].abs().sum() > 0


def test_reweighted_logits_equal_the_formula():
    prototypes = hand_built(1)
    prototypes.complement(TASKS, first=0, recalc=True)
    features = torch.randn(3, 3, 4, generator=torch.Generator().manual_seed(2))
    logits = prototypes.logits(features, TASKS, first=0, alpha=0.3, beta=0.0)
    cos = lambda a, b: F.cosine_similarity(a, b, dim=0)  # noqa: E731
    for n in range(3):
        for task, classes in enumerate(TASKS):
            for c in classes:
                others = sum(cos(features[n, j], prototypes.weights[c, j]) for j in range(3) if j != task)
                expected = cos(features[n, task], prototypes.weights[c, task]) + 0.3 / 2 * others
                torch.testing.assert_close(logits[n, c], expected)


def test_pretrained_subspace_weighs_beta():
    prototypes = SubspacePrototypes(4)
    prototypes.weights = torch.randn(2, 2, 4)
    features = torch.randn(3, 2, 4)
    cosines = torch.einsum("nsd,csd->ncs", F.normalize(features, dim=2), F.normalize(prototypes.weights, dim=2))
    logits = prototypes.logits(features, [range(0, 2)], first=1, alpha=0.1, beta=0.5)
    torch.testing.assert_close(logits, cosines[..., 1] + 0.5 * cosines[..., 0])


def test_later_settings_apply_only_when_the_first_task_differs_in_size(tmp_path):
    """As the official code: ``later_epochs``/``later_lr`` for tasks 2.. of a B4-Inc2 stream, not of an Inc2 one."""
    for init_cls, later in ((4, [3, 3, 3]), (2, [1, 1, 1, 1])):
        run = Run(ease_config(tmp_path / str(init_cls), init_cls=init_cls, later_epochs=3, later_lr=0.5))
        epochs = [run.learner.task_settings(task).tuned_epoch for task in run.stream.tasks]
        assert epochs == [1] + later


def test_each_task_adds_one_trained_adapter_and_leaves_earlier_ones_bit_identical(tmp_path):
    run = Run(ease_config(tmp_path))
    learner = run.learner
    for task in run.stream.tasks:
        earlier = [{k: v.clone() for k, v in a.state_dict().items()} for a in learner.net["adapters"]]
        learner.fit(task)
        adapters = learner.net["adapters"]
        assert len(adapters) == task.index + 1
        for before, adapter in zip(earlier, adapters):
            assert all(torch.equal(v, adapter.state_dict()[k]) for k, v in before.items())
        new = adapters[-1]
        assert all(unit.up.weight.abs().sum() > 0 for unit in new.units), "the new adapter trained (up starts at 0)"
        assert not any(p.requires_grad for p in learner.net.parameters())
        assert list(learner.net) == ["adapters"], "the temporary head must not outlive its task"
        assert learner.prototypes.weights.shape[:2] == (task.num_seen, task.index + 1)


def test_end_to_end_encodes_each_image_once_per_subspace(tmp_path):
    run = Run(ease_config(tmp_path))
    result = run.execute()
    assert result["last_accuracy"] > 50  # 10 classes: chance is 10%
    tasks = run.stream.tasks
    # adapter j encodes the training images of tasks j.. (its real prototypes) and the test images of all tasks
    expected = sum(sum(len(t.train) for t in tasks[j:]) + sum(len(t.test) for t in tasks) for j in range(len(tasks)))
    assert result["timings"]["encoded_images"] == expected


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    # with the pretrained subspace too, so both kinds of subspace are rebuilt from the checkpoint
    assert_resume_matches_uninterrupted(lambda folder: ease_config(tmp_path / folder, use_init_ptm=True, beta=1.0))
