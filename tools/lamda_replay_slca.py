"""SLCA (and CoFiMA) under pilot's PILOT profile beside LAMDA-PILOT's own ``models/slca.py`` (``models/cofima.py``)
(issue 21): a family of ``tools/lamda_official_replay.py`` (registered in its tables at import).

Both fine-tune the whole tiny random ViT (at lrate x bcb_lrscale) and each task's new linear head (at lrate) on the
same batches, from PILOT's drawn head rows; then per new class a Gaussian (mean, covariance + 1e-4 I) of the
training features; from the second task on, classifier alignment (CA) re-trains every seen head on 256 features a
class drawn from the Gaussians at shrunken means, with logit normalisation; the next task trains from the heads as
they were before CA. CA's random draws are PILOT's: its standard-normal noise (one [256, D] block per class and
epoch, recorded inside ``MultivariateNormal``) and its shuffle (``torch.randperm``) are recorded and given to
pilot's ``ClassGaussians.sample`` in place of its generator's, so pilot's own sampling formula (shrunken mean +
Cholesky factor x noise, labels, order) is what is compared. After every task: the trained ViT, the heads before
and after CA, the class means and covariances, the CA features of each epoch and the test logits.

    python tools/lamda_official_replay.py --learner slca
    python tools/lamda_official_replay.py --learner slca --break ca_mean_shrink    # must print "agree": false
    python tools/lamda_official_replay.py --learner cofima                         # with the profile's old_head_fisher
    python tools/lamda_official_replay.py --protocol p1 --learner slca --assets ../shared/assets  # P1 itself

"""
from __future__ import annotations

import contextlib
import copy
import sys
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lamda_official_replay import (BREAKS, CHECKS, P1_LEARNERS, PATCHES, PROFILE_SETTINGS, TASKS,  # noqa: E402
                                   Schedule, announce, both_trained, largest, official_args, profile_report,
                                   profile_result, profile_setup, same_batches)

# PILOT's training keys at small values, on both sides (the rest: the profile on pilot's side, the same keys on
# PILOT's): two epochs with a step decay after the first, two CA epochs (its cosine reaches 0 at the second).
# bcb_lrscale 0.1 (the profile's 0.01 moves the tiny ViT by ~4e-5 in 6 steps, 4x the tolerance; at 0.1 by ~4e-4)
# CoFiMA the same (its Fisher weighting and wt_lambda from the profile).
SLCA_SETTINGS = {learner: {"epochs": 2, "lrate": 0.01, "milestones": [1], "batch_size": 4, "ca_epochs": 2,
                           "bcb_lrscale": 0.1} for learner in ("slca", "cofima")}
# CoFiMA's Fisher entries (squared gradients, at most 1e-4) of the backbone and the new head, relative to the largest:
# the two codes' merges round differently (PILOT multiplies Fisher and weights before summing), which leaves the
# merged ViT 2e-7 apart; the next task's squared gradients then differ by up to 1.1e-5 (notes)
FISHER_TOLERANCE = 1e-4
SLCA_BREAKS = {
    "ca_mean_shrink": "pilot's SLCA draws CA's features around the class means themselves (PILOT: the means of a "
                      "class of task j shrunk by 0.9 + 0.1 (j + 1) / (t + 1) at task t)",
    "aligned_heads_kept": "pilot's SLCA trains the next task from the aligned heads (PILOT restores the heads as they "
                          "were before CA: fc.backup() / fc.recall())",
    "new_head_trained": "pilot's CoFiMA keeps the new task's trained head through the merge (new_head 'trained'; "
                        "PILOT: its capped Fisher times its weights, about zero)",
    "own_old_head_fisher": "pilot's CoFiMA with old_head_fisher 'true': the old heads' true squared gradients "
                           "(PILOT, and the profile: the squares of the stale .grad its last alignment left on them)"}
SLCA_PATCHES = [
    "slca: utils.inc_net.get_backbone -> a copy of pilot's tiny random ViT as it was built (eval mode, every "
    "parameter trainable, as timm's create_model gives it), out_dim = its width; the data manager's dataset_name "
    "'synthetic' (models/slca.py reads it)",
    "slca: _compute_accuracy -> nothing (its per-epoch train accuracy iterates the shuffled train loader a second "
    "time, which would move the shared batch order on by an epoch; it only logs)",
    "slca: _network.update_fc wrapped to record each task's drawn head; its rows copied into pilot's task head "
    "before pilot trains",
    "slca: during PILOT's incremental_train, torch.distributions.multivariate_normal._standard_normal and "
    "torch.randperm wrapped to record CA's noise and shuffle; pilot's ClassGaussians.sample given them in place "
    "of its generator's torch.randn / torch.randperm",
    "cofima: args['prefix'] '' (models/cofima.py reads it); getFisherDiagonal given its train loader rewound to the "
    "task's first epoch (the order of pilot's fresh Fisher loader; PILOT's would be the epoch after the last)"]


def vit_pairs(ours: torch.nn.Module, theirs: torch.nn.Module) -> list:
    """(name, pilot's, PILOT's) for every parameter of two copies of the same ViT."""
    their_parameters = dict(theirs.named_parameters())
    return [(f"vit.{name}", mine, their_parameters.get(name, torch.full((0,), 0.0)))
            for name, mine in ours.named_parameters()]


def their_heads(state: dict, tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PILOT's ``SimpleContinualLinear`` state (one ``heads.<t>.0`` Linear a task) as one weight and one bias."""
    return (torch.cat([state[f"heads.{t}.0.weight"] for t in range(tasks)]),
            torch.cat([state[f"heads.{t}.0.bias"] for t in range(tasks)]))


def our_heads(heads: torch.nn.ModuleList, tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([h.weight for h in heads[:tasks]]), torch.cat([h.bias for h in heads[:tasks]])


class AlignmentDraws:
    """CA's random draws, recorded on PILOT's side and replayed on pilot's: per CA epoch, the standard-normal noise
    of each class's ``MultivariateNormal.sample`` (stacked [classes, 256, D]), the shuffle, and PILOT's shuffled
    features (to compare with what pilot's ``ClassGaussians.sample`` makes of the same noise)."""

    def __init__(self):
        self.noise, self.orders, self.features, self.ours = [], [], [], []
        self._blocks, self._samples = [], []

    @contextlib.contextmanager
    def recording(self):
        """Around PILOT's ``incremental_train``: its CA draws one noise block per class, then one shuffle an epoch."""
        import torch.distributions.multivariate_normal as mvn
        standard_normal, randperm, sample = mvn._standard_normal, torch.randperm, mvn.MultivariateNormal.sample

        def recording_normal(*args, **kwargs):
            self._blocks.append(standard_normal(*args, **kwargs))
            return self._blocks[-1]

        def recording_sample(distribution, *args, **kwargs):
            self._samples.append(sample(distribution, *args, **kwargs))
            return self._samples[-1]

        def recording_randperm(*args, **kwargs):
            order = randperm(*args, **kwargs)
            self.noise.append(torch.stack(self._blocks))
            self.orders.append(order)
            self.features.append(torch.cat(self._samples)[order])
            self._blocks, self._samples = [], []
            return order

        with mock.patch.object(mvn, "_standard_normal", recording_normal), \
                mock.patch.object(mvn.MultivariateNormal, "sample", recording_sample), \
                mock.patch.object(torch, "randperm", recording_randperm):
            yield

    def replaying(self, sample):
        """pilot's ``ClassGaussians.sample`` drawing PILOT's next epoch's noise and shuffle; its output kept."""
        def replayed(gaussians, cholesky_factors, per_class, mean_scales, generator):
            noise, order = self.noise[len(self.ours)], self.orders[len(self.ours)]
            with mock.patch.object(torch, "randn", lambda *_, **__: noise.clone()), \
                    mock.patch.object(torch, "randperm", lambda *_, **__: order.clone()):
                features, labels = sample(gaussians, cholesky_factors, per_class, mean_scales, generator)
            self.ours.append(features)
            return features, labels
        return replayed


def their_fisher_name(name: str) -> str:
    """PILOT's name of a pilot CoFiMA Fisher entry: ``heads.<t>.weight`` is its ``fc.heads.<t>.0.weight``."""
    if name.startswith("heads."):
        _, task, kind = name.split(".")
        return f"fc.heads.{task}.0.{kind}"
    return name


def record_fishers(official, ours) -> dict:
    """CoFiMA: PILOT's Fisher pass over the order of the task's first epoch (pilot's Fisher loader is a fresh one);
    pilot's Fisher of each task kept in the returned dict (``ours``)."""
    record, get_fisher, our_fisher = {}, official.getFisherDiagonal, ours.fisher

    def first_epoch_fisher(loader, optimizer):
        loader.epoch = 0
        return get_fisher(loader, optimizer)

    def recording_fisher(task):
        record["ours"] = our_fisher(task)
        return record["ours"]

    official.getFisherDiagonal, ours.fisher = first_epoch_fisher, recording_fisher
    return record


def is_old_head(name: str, task) -> bool:
    return name.startswith("heads.") and int(name.split(".")[1]) < task.index


def fisher_pairs(official, ours, record: dict, task) -> tuple[list, list]:
    """(the backbone's and new head's entries, the old heads' entries): pilot's own Fisher (capped at its
    fishermax, as PILOT stores it) against PILOT's of the same task."""
    theirs, cap = official.fisher_mat[-1], ours.config.fishermax
    pairs = {name: (f"fisher {name}", value.clamp(max=cap), theirs[their_fisher_name(name)])
             for name, value in record["ours"].items()}
    return ([pair for name, pair in pairs.items() if not is_old_head(name, task)],
            [pair for name, pair in pairs.items() if is_old_head(name, task)])


def check_slca_learner(learner: str, broken: str = "", tasks: int = TASKS, protocol: str = "tiny",
                       settings: dict | None = None) -> dict:
    """SLCA or CoFiMA under pilot's PILOT profile beside PILOT's ``models/<learner>.py``: the same tiny ViT
    fine-tuned slowly on the same batches from PILOT's drawn head rows, the same class Gaussians and CA draws;
    after every task the ViT, the heads before and after CA, the Gaussians, the CA features (CoFiMA: the Fisher)
    and the logits are compared. ``protocol`` "p1": P1 itself (DeiT-Tiny, CIFAR-100's subset, PILOT's
    transforms and augmentation shared, its config as ``tools/lamda_pilot.py`` runs it; ``settings`` laid over
    both sides, a cut-down trial)."""
    import utils.inc_net as inc_net
    from pilot.modules.gaussians import ClassGaussians
    module = __import__(f"models.{learner}", fromlist=["Learner"])
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as patches:
        run, banks, args = profile_setup(learner, Path(folder), tasks, protocol, settings)
        schedule = Schedule()
        if protocol == "tiny":
            args = {**official_args(learner, run), "seed": 1, "prefix": ""}  # models/<learner>.py reads both
        pretrained = copy.deepcopy(run.ctx.backbone).requires_grad_(True).eval()
        pretrained.out_dim = run.ctx.backbone.feature_dim
        patches.enter_context(mock.patch.object(inc_net, "get_backbone", lambda *_, **__: copy.deepcopy(pretrained)))
        torch.manual_seed(1)
        official = module.Learner(args)
        official._compute_accuracy = lambda *_: 0.0
        data_manager = same_batches(run, banks, schedule, module)
        data_manager.dataset_name = "synthetic"
        network, ours, drawn, draws = official._network, run.learner, {}, AlignmentDraws()
        update_fc, incremental_train = network.update_fc, official.incremental_train

        def recording_update_fc(size):
            update_fc(size)
            drawn.update(weight=network.fc.heads[-1][0].weight.detach().clone(),
                         bias=network.fc.heads[-1][0].bias.detach().clone())

        def recorded_incremental_train(manager):
            with draws.recording():
                incremental_train(manager)

        network.update_fc, official.incremental_train = recording_update_fc, recorded_incremental_train
        patches.enter_context(mock.patch.object(ClassGaussians, "sample", draws.replaying(ClassGaussians.sample)))
        if broken == "ca_mean_shrink":
            ours.mean_scales = lambda: torch.ones(ours.num_seen)
        if broken == "aligned_heads_kept":
            align_classifier = ours.align_classifier

            def align_and_keep():
                align_classifier()
                ours.net["heads"].load_state_dict(ours.net["aligned_heads"].state_dict())

            ours.align_classifier = align_and_keep

        if learner == "cofima":
            fisher = record_fishers(official, ours)
            if broken == "new_head_trained":
                ours.config.new_head = "trained"
            if broken == "own_old_head_fisher":
                ours.config.old_head_fisher = "true"

        def drawn_rows(task):  # PILOT's draw into pilot's task head, before pilot trains
            with torch.no_grad():
                ours.net["heads"][task.index].weight.copy_(drawn["weight"])
                ours.net["heads"][task.index].bias.copy_(drawn["bias"])

        reports = []
        for task, seen in both_trained(run, official, schedule, data_manager, drawn_rows):
            count = task.index + 1
            test_labels = np.concatenate([t.test.labels for t in seen])
            images = banks["test"][torch.from_numpy(np.concatenate([t.test.indices for t in seen]))]
            our_logits = torch.cat([ours.predict(t.test) for t in seen])
            network.eval()
            with torch.no_grad():
                their_logits = network(images)["logits"][:, : task.num_seen]
            vit = vit_pairs(run.ctx.backbone, network.backbone)
            trained = list(zip(("trained head.weight", "trained head.bias"), our_heads(ours.net["heads"], count),
                               their_heads(network.fc.old_state_dict, count)))
            aligned = list(zip(("aligned head.weight", "aligned head.bias"),
                               our_heads(ours.net["aligned_heads"], count), their_heads(network.fc.state_dict(), count)))
            gaussians = [("class means", ours.gaussians.means, torch.from_numpy(official._class_means_slca)),
                         ("class covariances", ours.gaussians.covs, official._class_covs_slca)]
            features = [(f"CA features, epoch {e + 1}", mine, theirs)
                        for e, (mine, theirs) in enumerate(zip(draws.ours, draws.features))]
            if len(draws.ours) != len(draws.features):
                features.append(("CA epochs", torch.zeros(len(draws.ours)), torch.zeros(len(draws.features))))
            extra = {"vit_moved_by": largest(vit_pairs(network.backbone, pretrained))[1],
                     "ca_moved_heads_by": largest([(n, a, t) for (n, _, a), (_, _, t) in zip(aligned, trained)])[1],
                     "vit_relative": largest(vit)[2], "trained_head_relative": largest(trained)[2],
                     "aligned_head_relative": largest(aligned)[2], "gaussians_relative": largest(gaussians)[2],
                     "ca_epochs_compared": len(features),
                     "ca_features_relative": largest(features)[2] if features else 0.0}
            fishers, old_heads = [], []
            if learner == "cofima":
                fishers, old_heads = fisher_pairs(official, ours, fisher, task)
                extra.update(fisher_relative=largest(fishers)[2],
                             old_head_fisher_relative=largest(old_heads)[2] if old_heads else 0.0)
            report = profile_report(task, vit + trained + aligned + gaussians + features, their_logits, our_logits,
                                    test_labels, extra)
            reports.append({**report, "agree": report["agree"] and largest(fishers + old_heads)[2] <= FISHER_TOLERANCE})
            announce(protocol, learner, reports[-1])
            draws.noise, draws.orders, draws.features, draws.ours = [], [], [], []
            official.after_task()
        run.ctx.access.open()
    return profile_result(learner, protocol, reports)


CHECKS.update(slca=check_slca_learner, cofima=check_slca_learner)
BREAKS.update(SLCA_BREAKS)
PATCHES.extend(SLCA_PATCHES)
P1_LEARNERS.extend(["slca", "cofima"])
PROFILE_SETTINGS.update(SLCA_SETTINGS)
