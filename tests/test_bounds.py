"""The lower and upper bounds: fine-tuning on each task's data alone, and joint training on all seen data."""
import pytest
import torch

from pilot.configure import build_config
from pilot.engine import Run
from pilot.learners._gradient import make_scheduler
from pilot.learners.finetune import Finetune

from conftest import assert_resume_matches_uninterrupted, tiny_raw


def bound_config(tmp_path, learner, **overrides):
    return build_config(tiny_raw(tmp_path, **{"model_name": learner, "init_epoch": 1, "epochs": 1, "batch_size": 8,
                                              "init_milestones": [], "milestones": [], **overrides}))


def test_finetune_changes_every_backbone_weight(tmp_path):
    run = Run(bound_config(tmp_path, "finetune"))
    before = {k: v.clone() for k, v in run.ctx.backbone.named_parameters()}
    run.learner.fit(run.stream.tasks[0])
    unchanged = [k for k, v in run.ctx.backbone.named_parameters() if torch.equal(v, before[k])]
    assert not unchanged


def test_first_and_later_tasks_use_their_own_settings(tmp_path):
    config = bound_config(tmp_path, "finetune", init_epoch=2, init_lr=0.05, init_weight_decay=0.01, epochs=3,
                          lrate=0.02, weight_decay=0.003).learner
    first, later = Finetune.settings(config, True), Finetune.settings(config, False)
    assert (first.tuned_epoch, first.init_lr, first.weight_decay) == (2, 0.05, 0.01)
    assert (later.tuned_epoch, later.init_lr, later.weight_decay) == (3, 0.02, 0.003)
    assert first.optimizer == later.optimizer == "sgd"


def test_pilots_milestones_past_the_last_epoch_warn_and_keep_the_rate(tmp_path):
    with pytest.warns(UserWarning, match=r"milestones \[60, 120\] are at or past the last epoch \(2 epochs\) of "
                                         r"the first task: the learning rate does not decay there") as warned:
        config = bound_config(tmp_path, "finetune", init_milestones=[60, 120], init_epoch=2).learner
    assert len([w for w in warned if "milestones" in str(w.message)]) == 1  # later tasks' milestones are []
    settings = Finetune.settings(config, True)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=settings.init_lr)
    scheduler = make_scheduler(optimizer, settings)
    for _ in range(settings.tuned_epoch):  # run as PILOT runs it: MultiStepLR never reaches epoch 60
        assert optimizer.param_groups[0]["lr"] == settings.init_lr
        scheduler.step()


@pytest.mark.parametrize("learner", ["finetune", "joint"])
def test_training_data_is_the_task_or_everything_seen(tmp_path, learner, monkeypatch):
    run = Run(bound_config(tmp_path, learner))
    sizes = []
    make = run.ctx.train_loader
    monkeypatch.setattr(run.ctx, "train_loader", lambda split, *a, **k: sizes.append(
        (len(split), sorted(set(split.labels.tolist())))) or make(split, *a, **k))
    result = run.execute()
    tasks = run.stream.tasks
    if learner == "finetune":
        assert sizes == [(len(t.train), list(t.classes)) for t in tasks]
        assert result["continual"] is True
    else:
        assert sizes == [(sum(len(s.train) for s in tasks[: t.index + 1]), list(range(t.num_seen))) for t in tasks]
        assert result["continual"] is False


@pytest.mark.parametrize("learner", ["finetune", "joint"])
def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, learner):
    assert_resume_matches_uninterrupted(lambda folder: bound_config(tmp_path / folder, learner))


def pilot_finetune_by_hand(backbone, head, batches, known, settings, epochs):
    """PILOT's finetune loop written out: one growing linear head over all seen classes, SGD over every
    parameter, cross-entropy on the new classes' logits only (``logits[:, known:]``, targets - known)."""
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(params, lr=settings.init_lr, momentum=0.9, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, settings.milestones, settings.lr_decay)
    backbone.train()
    for _ in range(epochs):
        for images, labels, _ in batches:
            logits = head(backbone(images))
            loss = torch.nn.functional.cross_entropy(logits[:, known:], labels - known)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()


def test_finetune_trains_as_pilots_loop_written_out(tmp_path, monkeypatch):
    """Two tasks (the first with its own rate, decay and milestone) on fixed batches: the backbone and the
    head rows equal those of PILOT's loop by hand, so finetune's results are the method's, not a fault."""
    import copy
    run = Run(bound_config(tmp_path, "finetune", init_epoch=2, init_lr=0.05, init_milestones=[1],
                           init_weight_decay=0.01, epochs=2, lrate=0.02, weight_decay=0.003))
    learner, tasks = run.learner, run.stream.tasks[:2]
    generator = torch.Generator().manual_seed(0)
    batches = {t.index: [(torch.randn(4, 3, 32, 32, generator=generator),
                          torch.tensor([t.classes.start + i % len(t.classes) for i in range(4)]), None)
                         for _ in range(2)] for t in tasks}
    monkeypatch.setattr(run.ctx, "train_loader", lambda split, *a, **k: batches[
        next(t.index for t in tasks if int(split.labels[0]) in t.classes)])
    backbone = copy.deepcopy(run.ctx.backbone)
    heads = learner.net["heads"]
    for task in tasks:
        head = torch.nn.Linear(heads[0].in_features, task.num_seen)  # PILOT grows by copying the rows
        with torch.no_grad():
            head.weight.copy_(torch.cat([h.weight for h in heads[: task.index + 1]]))
            head.bias.copy_(torch.cat([h.bias for h in heads[: task.index + 1]]))
        learner.fit(task)
        settings = learner.task_settings(task)
        pilot_finetune_by_hand(backbone, head, batches[task.index], task.num_old, settings, settings.tuned_epoch)
        for (name, ours), theirs in zip(run.ctx.backbone.named_parameters(), backbone.parameters()):
            torch.testing.assert_close(ours, theirs, msg=f"task {task.index}: {name}")
        torch.testing.assert_close(torch.cat([h.weight for h in heads[: task.index + 1]]), head.weight)
