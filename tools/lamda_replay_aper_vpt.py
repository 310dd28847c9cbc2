"""APER with VPT (``aper_vpt_deep``, ``aper_vpt_shallow``, issue 21) under pilot's PILOT profile beside LAMDA-PILOT's
own ``models/aper_vpt.py``: a family of ``tools/lamda_official_replay.py`` (registered in its tables at import).

Both codes train VPT prompt tokens (zero at the start in both) and a temporary cosine head on the first task, on
the same tiny random ViT, images and batches, with PILOT's drawn head copied into pilot's; then both classify every
task by cosine prototypes of the pre-trained and the prompted features concatenated. After every task the trained
prompts, the task-1 head (and its sigma), the prototypes of each branch and the test logits are compared.

    python tools/lamda_official_replay.py --learner aper_vpt_shallow       # or aper_vpt_deep
    python tools/lamda_official_replay.py --learner aper_vpt_shallow --break prompt_span   # must print "agree": false

"""
from __future__ import annotations

import contextlib
import copy
import sys
import tempfile
from functools import partial
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lamda_official_replay import (BREAKS, CHECKS, P1_LEARNERS, PATCHES, PROFILE_SETTINGS, TASKS,  # noqa: E402
                                   Schedule, announce, both_trained, image_banks, largest, p1_args, p1_run,
                                   pilots_own_args, profile_report, profile_result, profile_run, same_batches,
                                   share_first_head, side_by_side, unaugmented_test_mode)
from pilot.engine import Run  # noqa: E402

VPT_LEARNERS = ("aper_vpt_deep", "aper_vpt_shallow")  # pilot's profile files; both are model_name aper_vpt
# PILOT's init_lr 0.01 moves the zero prompts by ~1e-2 in these 6 steps (printed as prompts_moved_by)
VPT_SETTINGS = {"tuned_epoch": 2, "batch_size": 4}
VPT_BREAKS = {"prompt_span": "pilot's shallow prompts leave after the first block (PILOT: they pass through every "
                             "block and leave after the last)",
              "prompt_position_embedding": "pilot's prompt tokens get the [CLS] position embedding added, as L2P's "
                                           "(PILOT's VPT adds none)"}
VPT_PATCHES = [
    "aper_vpt: timm.create_model -> a copy of pilot's tiny random ViT (DeiT-Tiny under --protocol p1; with a "
    "1000-class head where backbone/vpt.py's "
    "build_promptmodel pops head.weight and head.bias, without one for num_classes=0), so PILOT's own get_backbone "
    "and build_promptmodel build both branches",
    "aper_vpt: backbone.vpt.VPT_ViT -> the same class at the tiny ViT's size (image and patch size, width, depth, "
    "heads; tools/lamda_pilot.py's edit sets width 192 and 3 heads at ViT-Ti); utils.inc_net.get_backbone wrapped "
    "to set out_dim to the tiny width (768 in it)",
    "aper_vpt: the drawn task-1 cosine head and its trained weights and sigma recorded (update_fc and _init_train "
    "wrapped), the drawn head and the (zero) prompts copied into pilot's; args: PILOT's exps/aper_vpt_<type>.json "
    "with tuned_epoch 2, batch_size 4",
    "aper_vpt --protocol p1: the data manager's mode='test' datasets of the training source use the un-augmented "
    "bank (APER's train_loader_for_protonet is shuffled, and Batches augments every shuffled loader under P1)"]


def vpt_backbones_from_pilots(run: Run, patches: contextlib.ExitStack) -> None:
    """PILOT's ``get_backbone`` builds its VPT ViT and its pre-trained branch from pilot's ViT (the tiny random one;
    DeiT-Tiny under P1): timm's ``create_model`` gives a copy of it, ``VPT_ViT`` takes its size, ``out_dim`` its
    width."""
    import timm
    import utils.inc_net as inc_net
    from backbone import vpt
    timm_vit = run.ctx.backbone.model
    width = timm_vit.embed_dim

    def copy_of_pilots(name, pretrained=False, num_classes=None, **_):
        model = copy.deepcopy(timm_vit)
        model.reset_classifier(1000 if num_classes is None else num_classes)  # build_promptmodel pops its head
        return model

    get_backbone = inc_net.get_backbone

    def pilots_width(args, pretrained=False):
        model = get_backbone(args, pretrained)
        model.out_dim = width
        return model

    patches.enter_context(mock.patch.object(timm, "create_model", copy_of_pilots))
    patches.enter_context(mock.patch.object(vpt, "VPT_ViT", partial(
        vpt.VPT_ViT, img_size=timm_vit.patch_embed.img_size, patch_size=timm_vit.patch_embed.patch_size,
        embed_dim=width, depth=len(timm_vit.blocks), num_heads=timm_vit.blocks[0].attn.num_heads)))
    patches.enter_context(mock.patch.object(inc_net, "get_backbone", pilots_width))


def loaded_as_pilots(prompted: torch.nn.Module, run: Run) -> None:
    """PILOT loads its VPT ViT with ``strict=False``: every weight but the prompts must be pilot's ViT's."""
    ours = run.ctx.backbone.model.state_dict()
    for name, tensor in prompted.state_dict().items():
        if name != "Prompt_Tokens":
            assert torch.equal(tensor, ours[name]), name


def vpt_prompt_pairs(ours, prompted: torch.nn.Module) -> list:
    """(name, pilot's, PILOT's): prompts [layers, length, D] (PILOT ``Prompt_Tokens``; deep: one layer a block)."""
    return [("prompts", torch.stack([unit.tokens for unit in ours.net["adaptation"].units]), prompted.Prompt_Tokens)]


def break_prompts(ours, broken: str) -> None:
    """``VPT_BREAKS`` on pilot's side: the hooks that add and drop the prompt tokens, re-registered changed."""
    prompts = ours.net["adaptation"]
    blocks = ours.ctx.backbone.model.blocks
    if broken == "prompt_span" and len(prompts.units) == 1:  # handles: [first block's pre-hook, last block's hook]
        prompts._handles.pop().remove()
        prompts._handles.append(blocks[0].register_forward_hook(prompts.units[0].drop))
    if broken == "prompt_position_embedding":
        cls_position = ours.ctx.backbone.model.pos_embed[0, :1]
        targets = list(blocks) if len(prompts.units) == len(blocks) else [blocks[0]]
        for index, (block, unit) in enumerate(zip(targets, prompts.units)):
            def append(block, args, unit=unit):
                if not unit.active:
                    return None
                tokens = (unit.tokens + cls_position).expand(args[0].shape[0], -1, -1)
                return (torch.cat([args[0], tokens], dim=1), *args[1:])
            prompts._handles[2 * index].remove()
            prompts._handles[2 * index] = block.register_forward_pre_hook(append)


def check_vpt_learner(learner: str, broken: str = "", tasks: int = TASKS, protocol: str = "tiny",
                      settings: dict | None = None) -> dict:
    """APER-VPT (deep or shallow) under pilot's PILOT profile beside PILOT's ``models/aper_vpt.py`` (PILOT with
    its own exps/<learner>.json): both train zero-initialised prompt tokens and a temporary cosine head on the
    first task (PILOT's drawn head copied into pilot's), then keep cosine prototypes of the pre-trained and the
    prompted features concatenated (PILOT's ``MultiBranchCosineIncrementalNet``). ``protocol`` "p1": P1 itself
    (DeiT-Tiny, CIFAR-100's subset, PILOT's transforms and augmentation, PILOT's config with P1's keys; ``settings``
    laid over both sides, a cut-down trial)."""
    import models.aper_vpt as module
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as patches:
        torch.manual_seed(0)
        p1 = protocol == "p1"
        run = p1_run(learner, Path(folder), settings) if p1 else profile_run(learner, Path(folder), tasks)
        banks = image_banks(run, augment=p1)
        schedule = Schedule()
        args = p1_args(learner, run, settings) if p1 else pilots_own_args(learner, run)
        vpt_backbones_from_pilots(run, patches)
        torch.manual_seed(1)
        official = module.Learner(args)
        data_manager = same_batches(run, banks, schedule, module)
        unaugmented_test_mode(data_manager, banks)
        prompted = official._network.backbone  # PILOT's VPT ViT: APER's second branch once it has trained
        loaded_as_pilots(prompted, run)
        ours, drawn = run.learner, {}
        # both codes start the prompts at zero, so the copy below changes nothing; recorded to show it
        own_prompts_identical = all(torch.equal(mine, theirs) for _, mine, theirs in vpt_prompt_pairs(ours, prompted))
        with torch.no_grad():  # PILOT's drawn prompts into pilot's
            for _, mine, theirs in vpt_prompt_pairs(ours, prompted):
                mine.copy_(theirs)
        initial = [p.detach().clone() for _, p, _ in vpt_prompt_pairs(ours, prompted)]
        share_first_head(official, ours, drawn)
        break_prompts(ours, broken)
        width = run.ctx.backbone.feature_dim
        reports = []
        for task, seen in both_trained(run, official, schedule, data_manager):
            test_labels, images, our_logits, network = side_by_side(official, ours, seen, banks)
            with torch.no_grad():
                their_logits = network(images)["logits"][:, : task.num_seen]
            their_rows = network.fc.weight[: task.num_seen]
            prototypes = ours.classifier.prototypes
            # PILOT's MultiBranchCosineIncrementalNet: the pre-trained branch first, then the prompted one
            branches = [("prototypes, pre-trained branch", prototypes[:, :width], their_rows[:, :width]),
                        ("prototypes, prompted branch", prototypes[:, width:], their_rows[:, width:])]
            prompts = vpt_prompt_pairs(ours, prompted)
            head = [("task-1 head.weight", drawn["our_trained_head"], drawn["trained_head"]),
                    ("task-1 head.sigma", drawn["our_sigma"], drawn["sigma"])]
            moved = largest([(n, mine, start) for (n, mine, _), start in zip(prompts, initial)])[1]
            extra = {"own_prompts_identical": own_prompts_identical, "prompts_moved_by": moved,
                     "prompts_relative": largest(prompts)[2],
                     "task1_head_relative": largest(head)[2],
                     "pretrained_prototypes_relative": largest(branches[:1])[2],
                     "prompted_prototypes_relative": largest(branches[1:])[2],
                     "branches": len(network.backbones)}
            reports.append(profile_report(task, branches + prompts + head, their_logits, our_logits, test_labels,
                                          extra))
            announce(protocol, learner, reports[-1])
            official.after_task()
        run.ctx.access.open()
    return profile_result(learner, protocol, reports)


CHECKS.update(dict.fromkeys(VPT_LEARNERS, check_vpt_learner))
BREAKS.update(VPT_BREAKS)
PATCHES.extend(VPT_PATCHES)
P1_LEARNERS.extend(VPT_LEARNERS)
PROFILE_SETTINGS.update(dict.fromkeys(VPT_LEARNERS, VPT_SETTINGS))
