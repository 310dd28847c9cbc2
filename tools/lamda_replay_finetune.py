"""APER-Finetune and Finetune under pilot's PILOT profile beside LAMDA-PILOT's own ``models/aper_finetune.py`` and
``models/finetune.py`` (issue 21): a family of ``tools/lamda_official_replay.py`` (registered in its tables at
import).

- ``aper_finetune``: both fine-tune the whole tiny random ViT with a temporary cosine head on the first task
  (PILOT's drawn head copied into pilot's; SGD with momentum 0.9 and weight decay on every parameter, the
  cosine-annealed rate), then classify every task by cosine prototypes of the pre-trained and the tuned ViT's
  features concatenated; after every task the tuned ViT, the untouched pre-trained branch, the trained task-1
  head and sigma, the prototypes and the logits are compared.
- ``finetune``: both fine-tune the ViT and a linear head task by task (PILOT's drawn new rows copied into pilot's
  task heads), the old classes' logits out of the loss; after every task the ViT, the head and the logits.

    python tools/lamda_official_replay.py --learner aper_finetune           # or finetune
    python tools/lamda_official_replay.py --learner aper_finetune --break tuned_in_place   # must print "agree": false
    python tools/lamda_official_replay.py --protocol p1 --learner finetune --assets ../shared/assets  # P1 itself

"""
from __future__ import annotations

import contextlib
import copy
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lamda_official_replay import (BREAKS, CHECKS, P1_LEARNERS, PATCHES, PROFILE_SETTINGS, TASKS,  # noqa: E402
                                   Schedule, announce, both_trained, largest, official_args, profile_report,
                                   profile_result, profile_setup, record_draws, same_batches, share_first_head,
                                   side_by_side, unaugmented_test_mode)

# PILOT's training keys at small values, on both sides (the rest: the profile on pilot's side, the same keys on
# PILOT's). APER-Finetune: the profile's weight decay 0.05, min_lr 0 and SGD. Finetune: a step decay after the first
# epoch, and weight decay 0.05 on both phases so that the old rows' decay (they stay in the optimiser with zero
# gradient on both sides) is well above the tolerance.
FINETUNE_SETTINGS = {
    "aper_finetune": {"tuned_epoch": 2, "init_lr": 0.01, "batch_size": 4},
    "finetune": {"init_epoch": 2, "init_lr": 0.01, "init_milestones": [1], "init_weight_decay": 0.05, "epochs": 2,
                 "lrate": 0.01, "milestones": [1], "weight_decay": 0.05, "batch_size": 4}}
FINETUNE_BREAKS = {
    "tuned_in_place": "pilot's APER-Finetune tunes the pre-trained ViT itself, no copy (PILOT: a frozen pre-trained "
                      "branch beside the tuned copy)",
    "frozen_sigma": "pilot's APER-Finetune keeps its task-1 cosine head's scale at 1 (PILOT trains sigma with the ViT)",
    "unmasked_old_logits": "pilot's Finetune trains later tasks on the logits of every seen class (PILOT: the new "
                           "classes' alone)"}
FINETUNE_PATCHES = [
    "aper_finetune, finetune: utils.inc_net.get_backbone -> a copy of pilot's tiny random ViT as it was built (eval "
    "mode, every parameter trainable, as timm's create_model gives it), out_dim = its width; APER-Finetune calls it "
    "three times (the ViT it tunes, MultiBranchCosineIncrementalNet's unused backbone, the pre-trained branch)",
    "aper_finetune: the drawn task-1 cosine head and its trained weights and sigma recorded (update_fc and "
    "_init_train wrapped), the drawn head copied into pilot's",
    "finetune: _network.update_fc wrapped to record the rows it draws; each task's new rows copied into pilot's "
    "task head before it trains",
    "aper_finetune --protocol p1: the data manager's mode='test' datasets of the training source use the "
    "un-augmented bank (as for aper_vpt)"]


def trainable_copy(run) -> torch.nn.Module:
    """What PILOT's ``get_backbone`` returns for ``pretrained_vit_b16_224``: timm's ViT in eval mode, every
    parameter trainable; here pilot's tiny random ViT as it was built (PILOT fine-tunes all of it)."""
    backbone = copy.deepcopy(run.ctx.backbone).requires_grad_(True).eval()
    backbone.out_dim = run.ctx.backbone.feature_dim
    return backbone


def named(prefix: str, ours: torch.nn.Module, theirs: torch.nn.Module) -> list:
    """(name, pilot's, PILOT's) for every parameter of two copies of the same network."""
    their_parameters = dict(theirs.named_parameters())
    return [(f"{prefix}.{name}", mine, their_parameters.get(name, torch.full((0,), 0.0)))
            for name, mine in ours.named_parameters()]


def check_finetuned_learner(learner: str, broken: str = "", tasks: int = TASKS, protocol: str = "tiny",
                            settings: dict | None = None) -> dict:
    """APER-Finetune or Finetune under pilot's PILOT profile beside PILOT's ``models/<learner>.py``: the same tiny
    ViT fine-tuned on the same batches from PILOT's drawn head; after every task the trained ViT, the head (APER:
    the task-1 cosine head, the untouched pre-trained branch and the prototypes) and the logits are compared.
    ``protocol`` "p1": P1 itself (DeiT-Tiny, CIFAR-100's subset, PILOT's transforms and augmentation shared, its
    config as ``tools/lamda_pilot.py`` runs it; ``settings`` laid over both sides, a cut-down trial)."""
    import utils.inc_net as inc_net
    module = __import__(f"models.{learner}", fromlist=["Learner"])
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as patches:
        run, banks, args = profile_setup(learner, Path(folder), tasks, protocol, settings)
        schedule = Schedule()
        if protocol == "tiny":
            args = official_args(learner, run)
        pretrained = trainable_copy(run)
        initial = copy.deepcopy(pretrained)
        patches.enter_context(mock.patch.object(inc_net, "get_backbone", lambda *_, **__: copy.deepcopy(pretrained)))
        torch.manual_seed(1)
        official = module.Learner(args)
        data_manager = same_batches(run, banks, schedule, module)
        unaugmented_test_mode(data_manager, banks)
        ours, drawn, between = run.learner, {}, None
        if learner == "aper_finetune":
            share_first_head(official, ours, drawn)
            if broken == "tuned_in_place":
                ours.net["adaptation"] = ours.encoder = run.ctx.backbone.requires_grad_(True)
            if broken == "frozen_sigma":
                begin_task = ours.begin_task

                def begin_with_fixed_sigma(task):
                    begin_task(task)
                    if task.index == 0:
                        ours.net["head"].sigma.requires_grad_(False)

                ours.begin_task = begin_with_fixed_sigma
        else:
            drawn = record_draws(official, learner)
            if broken == "unmasked_old_logits":
                ours.mask_old_classes = False

            def new_rows(task):  # PILOT's draw into pilot's task head, before pilot trains
                with torch.no_grad():
                    ours.net["heads"][task.index].weight.copy_(drawn["weight"][task.num_old:])
                    ours.net["heads"][task.index].bias.copy_(drawn["bias"][task.num_old:])

            between = new_rows

        reports = []
        for task, seen in both_trained(run, official, schedule, data_manager, between):
            test_labels, images, our_logits, network = side_by_side(official, ours, seen, banks)
            with torch.no_grad():
                their_logits = network(images)["logits"][:, : task.num_seen]
            if learner == "aper_finetune":
                pretrained_branch, tuned_branch = network.backbones
                tuned = named("tuned", ours.net["adaptation"], tuned_branch)
                parameters = (tuned + named("pretrained", run.ctx.backbone, pretrained_branch)
                              + [("prototypes", ours.classifier.prototypes, network.fc.weight[: task.num_seen]),
                                 ("task-1 head.weight", drawn["our_trained_head"], drawn["trained_head"]),
                                 ("task-1 head.sigma", drawn["our_sigma"], drawn["sigma"])])
                # how far PILOT's training moved the ViT: the comparison is of trained weights
                extra = {"tuned_vit_moved_by": largest(named("", tuned_branch, initial))[1],
                         "tuned_vit_relative": largest(tuned)[2],
                         "pretrained_branch_relative": largest(parameters[len(tuned): -3])[2],
                         "prototypes_relative": largest(parameters[-3:-2])[2],
                         "task1_head_relative": largest(parameters[-2:])[2],
                         "sigma_ours": float(drawn["our_sigma"]), "sigma_pilot": float(drawn["sigma"])}
            else:
                heads = ours.net["heads"][: task.index + 1]
                vit = named("vit", run.ctx.backbone, network.backbone)
                parameters = vit + [("head.weight", torch.cat([h.weight for h in heads]), network.fc.weight),
                                    ("head.bias", torch.cat([h.bias for h in heads]), network.fc.bias)]
                extra = {"vit_moved_by": largest(named("", network.backbone, initial))[1],
                         "vit_relative": largest(vit)[2], "head_relative": largest(parameters[-2:])[2]}
            reports.append(profile_report(task, parameters, their_logits, our_logits, test_labels, extra))
            announce(protocol, learner, reports[-1])
            official.after_task()
        run.ctx.access.open()
    return profile_result(learner, protocol, reports)


CHECKS.update(aper_finetune=check_finetuned_learner, finetune=check_finetuned_learner)
BREAKS.update(FINETUNE_BREAKS)
PATCHES.extend(FINETUNE_PATCHES)
P1_LEARNERS.extend(["aper_finetune", "finetune"])
PROFILE_SETTINGS.update(FINETUNE_SETTINGS)
