"""MOS: adapter merge with momentum, classifier alignment, self-refined adapter retrieval."""
import pytest
import torch

from pilot.configure import build_config
from pilot.engine import Run
from pilot.modules.gaussians import ClassGaussians, kmeans

from conftest import assert_resume_matches_uninterrupted, tiny_raw


def mos_config(tmp_path, **overrides):
    return build_config(tiny_raw(tmp_path, **{"model_name": "mos", "tuned_epoch": 1, "batch_size": 8,
                                              "crct_epochs": 2, **overrides}))


def set_values(module, generator):
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))


def test_adapter_merge_equals_the_momentum_formula(tmp_path):
    run = Run(mos_config(tmp_path, adapter_momentum=0.1))
    learner, generator = run.learner, torch.Generator().manual_seed(0)
    for _ in range(2):  # two finished tasks' adapters with known values
        set_values(learner.net["current"], generator)
        learner.store_adapter()
    set_values(learner.net["current"], generator)
    stored = [a.state_dict() for a in learner.net["adapters"]]
    current = {k: v.clone() for k, v in learner.net["current"].state_dict().items()}
    learner.begin_task(run.stream.tasks[2])
    learner.after_step(run.stream.tasks[2])
    for name, value in learner.net["current"].state_dict().items():
        expected = 0.9 * current[name] + 0.1 * (stored[0][name] + stored[1][name]) / 2
        torch.testing.assert_close(value, expected)
    for adapters, before in zip(learner.net["adapters"], stored):  # stored adapters are never rewritten
        assert all(torch.equal(v, before[k]) for k, v in adapters.state_dict().items())


def test_official_merge_pulls_each_block_before_its_forward_and_all_before_the_step(tmp_path):
    """``adapter_merge: "forward"``: the official loop pulls every block's adapter towards the anchor before
    each block runs, then once after the step; so block k runs with k + 1 pulls, the step sees ``depth``."""
    run = Run(mos_config(tmp_path, adapter_momentum=0.1, adapter_merge="forward"))
    learner, generator, task = run.learner, torch.Generator().manual_seed(0), run.stream.tasks[2]
    for _ in range(2):
        set_values(learner.net["current"], generator)
        learner.store_adapter()
    set_values(learner.net["current"], generator)
    learner.num_seen = task.num_seen
    learner.begin_task(task)
    start = {k: v.clone() for k, v in learner.net["current"].state_dict().items()}
    pulled = lambda name, n: 0.9 ** n * start[name] + (1 - 0.9 ** n) * learner.anchor[name]
    units, blocks = learner.net["current"].units, run.ctx.backbone.model.blocks
    at_use = {}

    def record(k):
        at_use.setdefault(k, units[k].down.weight.clone())

    for k, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda module, args, k=k: record(k))
    before_step, pull_before_step = {}, learner.before_step
    learner.before_step = lambda t: pull_before_step(t) or before_step.update(
        {k: v.clone() for k, v in learner.net["current"].state_dict().items()},
        grads={n: p.grad.clone() for n, p in learner.net["current"].named_parameters()})
    parameters = [p for p in learner.trainable() if p.requires_grad]
    images, labels, _ = next(iter(run.ctx.train_loader(task.train, 4)))
    learner.train_step(images, labels, task, torch.optim.SGD(parameters, lr=0.1), parameters, 0.0)
    for k in range(len(blocks)):
        torch.testing.assert_close(at_use[k], pulled(f"units.{k}.down.weight", k + 1))
    grads = before_step.pop("grads")
    for name, value in learner.net["current"].state_dict().items():
        torch.testing.assert_close(before_step[name], pulled(name, len(blocks)))
        stepped = pulled(name, len(blocks)) - 0.1 * grads[name]
        torch.testing.assert_close(value, 0.9 * stepped + 0.1 * learner.anchor[name])


def retrieval_by_hand(first_guess, features, head, class_tasks, tasks_seen):
    """The official ``_eval_cnn`` loop, one image at a time."""
    outputs = []
    for i in range(len(features)):
        previous = int(class_tasks[first_guess[i].argmax()])
        for loop in range(1, 5):
            logits = head(features[i, previous][None])[0]
            current = int(class_tasks[logits.argmax()])
            if loop >= 4 or current == previous:
                break
            previous = current
        outputs.append(logits.softmax(0) + (first_guess[i] * tasks_seen).softmax(0))
    return torch.stack(outputs)


def test_retrieval_picks_the_adapter_the_official_loop_picks(tmp_path):
    run = Run(mos_config(tmp_path))
    learner = run.learner
    for task in run.stream.tasks:
        learner.fit(task)
    split = run.stream.tasks[1].test
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(len(split), len(learner.stores), learner.ctx.backbone.feature_dim, generator=generator)
    learner.net["adapters"].stores = [lambda s, j=j: features[:, j] for j in range(len(learner.stores))]
    set_values(learner.net["head"], generator)  # a head that disagrees with the prototypes: several rounds
    with torch.no_grad():
        first_guess = learner.prototypes(features[:, 0])
        expected = retrieval_by_hand(first_guess, features, lambda x: learner.net["head"](x)[:, :learner.num_seen],
                                     run.ctx.protocol.task_of(torch.arange(learner.num_seen)), len(learner.stores))
    torch.testing.assert_close(learner.predict(split), expected)


def test_alignment_trains_the_head_only_and_keeps_statistics(tmp_path):
    run = Run(mos_config(tmp_path))
    learner = run.learner
    learner.fit(run.stream.tasks[0])
    learner.fit(run.stream.tasks[1])
    assert learner.statistics.num_classes == run.stream.tasks[1].num_seen
    head = {k: v.clone() for k, v in learner.net["head"].state_dict().items()}
    adapters = {k: v.clone() for k, v in learner.net["current"].state_dict().items()}
    learner.align_classifier()
    assert not torch.equal(head["weight"], learner.net["head"].weight)
    assert all(torch.equal(v, learner.net["current"].state_dict()[k]) for k, v in adapters.items())


def test_multi_centroid_statistics_sample_per_centroid():
    points = torch.cat([torch.randn(10, 3) - 5, torch.randn(10, 3) + 5])
    assignment = kmeans(points, 2, torch.Generator().manual_seed(0))
    assert len(set(assignment[:10].tolist())) == 1 and set(assignment[:10].tolist()) != set(assignment[10:].tolist())
    gaussians = ClassGaussians(3)
    gaussians.add_centroids(points, torch.zeros(20, dtype=torch.long), range(1), 2, torch.Generator().manual_seed(0))
    assert gaussians.num_classes == 2 and gaussians.owners.tolist() == [0, 0]
    assert torch.count_nonzero(gaussians.covs[0] - torch.diag(gaussians.covs[0].diagonal())) == 0
    _, labels = gaussians.sample(gaussians.cholesky_factors(torch.device("cpu")), 4, torch.ones(2),
                                 torch.Generator().manual_seed(1))
    assert labels.tolist() == [0] * 8


@pytest.mark.parametrize("storage", ["covariance", "multi-centroid"])
def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, storage):
    uninterrupted, _ = assert_resume_matches_uninterrupted(
        lambda folder: mos_config(tmp_path / folder, ca_storage_efficient_method=storage, n_centroids=2))
    assert uninterrupted["last_accuracy"] > 50  # 10 classes: chance is 10%
