"""pilot's learners beside LAMDA-PILOT's own ``models/<learner>.py``: the same tiny random ViT, the same images in
the same batches, the same freshly drawn heads, prompts, keys, adapters and random projection; after every task the
trained parameters and the test logits (and for iCaRL/DER the exemplar memory and NME class means) must agree.

- ``icarl``, ``der`` (issue 23): pilot's learners as configured here (PILOT's values, small); with ``--protocol p1``
  on P1 itself (DeiT-Tiny, CIFAR-100's P1 subset, PILOT's config and transforms, each training image augmented by
  PILOT's train transform from one seed per task, epoch and image, the same tensors given to both codes).
- ``simplecil``, ``ranpac``, ``l2p``, ``dualprompt`` (issue 21): pilot under its PILOT profile
  (``exps/reproduce/pilot/<learner>.json``'s method keys), the training keys small on both sides. Found: RanPAC's
  logits (pilot ``h @ W_o``, PILOT a cosine head on W_o's rows) and PILOT's float32 ridge (its lambda choice and
  solve break down at small lambda); DualPrompt's E-prefix layout in PILOT's ``backbone/prompt.py`` (a reshape that
  deals a batch's key/value halves over its samples; ``--official-fix prefix_layout`` shows it is the whole gap).
- ``fecam``, ``aper_adapter`` (issue 21): the same, both adapting PILOT's AdaptFormer ViT on the first task; FeCAM
  with ``pilot_covariance: true`` (PILOT's covariance, set by the profile).
- ``lae`` (issue 21): the same, on PILOT's LAE ViT (``backbone/vit_lae.py``) with its drawn Prefix PETs and head
  rows; the online and offline PETs, the head and the ensemble's probabilities are compared after every task.
- ``--protocol p1`` for ``l2p``, ``dualprompt``, ``lae``, ``ranpac`` (issue 21): P1 itself, as for iCaRL/DER. pilot's
  side is ``tools/reproduce.py``'s ``pilot`` column (``exps/<learner>_p1.json`` with ``profile_overrides``), PILOT's
  its own config as ``tools/lamda_pilot.py`` writes it for P1 (``nb_classes`` 100, ``nb_tasks`` 10 as its trainer
  sets them); PILOT's ViT classes at DeiT-Tiny's layout (depth 12) loaded with its weights through PILOT's own
  ``checkpoint_filter_fn``; the augmentation and batch order shared, PILOT's draws copied into pilot's. Reports
  both sides' accuracy after every task and Ā. DualPrompt also with ``--official-fix prefix_layout``.
- the families in files of their own (``FAMILIES``: ``tools/lamda_replay_*.py``, imported when a check runs; each
  registers its checks, breaks, fixes, patches and P1 learners in this module's tables), each also with
  ``--protocol p1``: ``aper_vpt_deep``, ``aper_vpt_shallow``, ``aper_finetune``, ``finetune``, ``mos``
  (``--official-fix eval_pulls``: PILOT's in-place adapter pulls outside training removed), ``slca``, ``cofima``.

PILOT is exported at the pinned commit (``tools/lamda_pilot.py``'s ``COMMIT``) into a temporary folder and imported
in this process only; nothing of it enters pilot. What is replaced around PILOT's learners, and why (``PATCHES``;
iCaRL and DER):

- ``timm.models.layers.weight_init``: timm 1.x moved it to ``timm.layers.weight_init`` (``backbone/linears.py``
  imports ``trunc_normal_`` from the old path); the old name is made an alias of the new module.
- ``utils.inc_net.get_backbone``: returns a copy of pilot's tiny random ViT as it was built (``out_dim`` set to its
  width) instead of downloading ViT-B/16; ``DERNet`` calls it once per task and loads the previous copy's weights.
- ``DataLoader`` in ``models/base.py``, ``models/icarl.py``, ``models/der.py``: batches of the fake data manager's
  images; shuffled loaders yield the batch order pilot's patched ``ctx.train_loader`` yields (per task and epoch,
  the training images ordered by one random key per image), unshuffled ones the dataset's order.
- the data manager: ``get_task_size`` and ``get_dataset`` (source, mode, appendent, ret_data as PILOT's
  ``utils/data_manager.py``) over pilot's synthetic images, each already through pilot's eval transform; a
  sample's "data" is its index in pilot's training (or test) source, so PILOT's memory reads as indices.
- ``_network.update_fc`` is wrapped to record the rows (and DER's columns and auxiliary head) it draws; pilot's
  learner gets them before it trains (``--break head_rows`` skips that copy).

    python tools/lamda_official_replay.py                      # every learner; --learner icarl | der | ...
    python tools/lamda_official_replay.py --break kd_temperature  # must print "agree": false
    python tools/lamda_official_replay.py --learner dualprompt --official-fix prefix_layout  # agrees
    python tools/lamda_official_replay.py --protocol p1 --learner der --assets ../shared/assets  # ~40 min, 1 thread
    python tools/lamda_official_replay.py --protocol p1 --learner l2p --assets ../shared/assets --tasks 1 \
        --set train_per_class=4 --set test_per_class=2 --set tuned_epoch=1  # a one-minute trial, not P1

Exit status 0 when every task agrees within the tolerance; prints the largest differences as JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from lamda_pilot import COMMIT, MIRROR, export  # noqa: E402
from pilot.configure import build_config  # noqa: E402
from pilot.engine import Run  # noqa: E402
from pilot.learners.icarl import exemplar_means, nme_logits  # noqa: E402

PARAMETER_TOLERANCE = 1e-5  # largest |ours - PILOT's| of a tensor over the largest |PILOT's|
# RanPAC's readout against PILOT's statistics solved in float64: the features agree to ~1e-6 (PILOT's ViT computes
# attention with its own bmm, timm fuses it) and the ridge system, G of rank <= the images seen plus lambda I,
# amplifies that by up to its condition number (printed as ridge_condition)
READOUT_TOLERANCE = 1e-4
# Prompts, keys and heads trained by Adam: Adam divides each gradient by its running RMS, so float rounding in
# near-zero gradients becomes steps of up to lr; with SGD in its place both codes agree to 6e-7 (notes)
ADAM_TOLERANCE = 1e-4
TASKS, TRAIN_PER_CLASS, TEST_PER_CLASS, MEMORY_SIZE = 3, 6, 3, 8  # 2 classes a task; 4, 2, 1 exemplars a class
TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2}
SETTINGS = {"init_epoch": 2, "init_lr": 0.01, "init_milestones": [1], "init_lr_decay": 0.1, "init_weight_decay": 5e-4,
            "epochs": 2, "lrate": 0.01, "milestones": [1], "lrate_decay": 0.1, "weight_decay": 2e-4, "batch_size": 4}
BREAKS = {"kd_temperature": "pilot's iCaRL distils at T = 1 (PILOT at T = 2)",
          "head_rows": "pilot's iCaRL/DER keep their own freshly drawn head rows instead of PILOT's",
          "prototype_images": "pilot's SimpleCIL leaves each class's last training image out of its prototype",
          "adapter_scale": "pilot's RanPAC adapters scale their branch by 0.2 (PILOT's ffn_adapter_scalar 0.1)",
          "prompt_position": "pilot's L2P adds no position embedding to its prompt tokens (PILOT: the [CLS] one)",
          "shared_prompt_pool": "pilot's DualPrompt starts each task's E-prompt afresh (PILOT: from the previous task's)",
          "covariance_ridge": "pilot's FeCAM ridges PILOT's covariance with 10 I before its corrcoef (PILOT: 100 I)",
          "pretrained_branch": "pilot's APER concatenates the adapted features twice (PILOT: pre-trained, adapted)",
          "lae_offline_start": "pilot's LAE with offline_from_start false (offline PET copied at task 2, as gqk/LAE)",
          "lae_first_freeze": "pilot's LAE with freeze_first_task false (PET trains from task 1's first epoch)"}
# --official-fix: name -> (the learner, what it changes in PILOT's code); diagnoses, each showing a difference found
FIXES = {"prefix_layout": ("dualprompt", "backbone/prompt.py EPrompt.forward's key/value axes moved before its "
                                         "reshape (DualPrompt's E-prefix layout)")}
PATCHES = ["timm.models.layers.weight_init -> timm.layers.weight_init (import alias)",
           "utils.inc_net.get_backbone -> a copy of pilot's tiny random ViT, out_dim = its width",
           "DataLoader in models.base, models.icarl, models.der -> fixed batches of the same images",
           "data_manager -> get_task_size / get_dataset over pilot's eval-transformed synthetic images",
           "_network.update_fc -> wrapped to record the rows it draws (copied into pilot's learner)",
           "simplecil: utils.inc_net.get_backbone -> a copy of pilot's tiny random ViT (eval mode), out_dim = its width",
           "ranpac: utils.inc_net.get_backbone -> backbone/vit_adapter.py's VisionTransformer at the tiny ViT's size, "
           "loaded as vit_base_patch16_224_adapter loads ViT-B/16 (qkv split into q/k/v, mlp.fc* renamed, all but "
           "the adapters frozen); its tuning_config in a SimpleNamespace (easydict is not installed)",
           "ranpac: the adapters' dropout 0.1 -> 0 on both sides (independent random masks otherwise)",
           "ranpac: _network.update_fc, _init_train, optimise_ridge_parameter wrapped to record the drawn cosine head "
           "(copied into pilot's), the trained head and sigma, W_rand (copied into pilot's projection) and lambda "
           "(also its rule re-run on the same features in float64)",
           "ranpac, pilot's side: split_fit_val -> PILOT's split (the first 80% of its shuffled protonet loader's "
           "order); select_lambda -> returns PILOT's lambda, pilot's own choice recorded",
           "l2p, dualprompt: utils.inc_net.get_backbone and PromptVitNet.get_original_backbone -> backbone/"
           "vit_l2p.py's (vit_dualprompt.py's) VisionTransformer at the tiny ViT's size (depth 5 for DualPrompt), "
           "loaded through its own checkpoint_filter_fn; args: PILOT's exps/<learner>.json with tuned_epoch 2, "
           "init_lr 0.01, batch_size 4",
           "--official-fix prefix_layout only: backbone/prompt.py EPrompt.forward's key/value axes moved before "
           "its reshape (a diagnosis)",
           "fecam, aper_adapter: utils.inc_net.get_backbone -> the adapter ViT as for ranpac (its adapters' dropout "
           "0 on both sides), and for APER's pre-trained branch (backbone_type without _adapter) a copy of pilot's "
           "tiny random ViT (eval mode); the drawn task-1 cosine head and its trained weights and sigma recorded "
           "(update_fc and _init_train wrapped), the drawn head copied into pilot's",
           "fecam: save_checkpoint -> nothing (it writes a .pkl into the working folder after the first task)",
           "--protocol p1: as for the tiny checks of each learner, at DeiT-Tiny's layout (PILOT's ViT classes "
           "at 224 / 16 / 192, depth 12) and with DeiT-Tiny's weights; PILOT's args those of tools/lamda_pilot.py "
           "(+ nb_classes 100, nb_tasks 10); shuffled mode-'train' loaders augmented as for iCaRL/DER (mode-'test' "
           "ones never); RanPAC's adapter dropout 0 on both sides (P1's 0.1 would draw independent masks)",
           "lae: timm.models.layers.helpers -> timm.layers.helpers (import alias, as for weight_init); "
           "utils.inc_net.get_backbone -> backbone/vit_lae.py's VisionTransformer at the tiny ViT's size (depth "
           "5: PILOT's LAE net hard-codes prefixes in blocks 0-4), loaded through its own checkpoint_filter_fn; the "
           "LAE net's backbone.out_dim 768 (hard-coded) -> the tiny width; update_fc wrapped to record each task's "
           "drawn head rows; PILOT's drawn PETs and head rows copied into pilot's; _eval_cnn's topk 5 -> 1; args: "
           "PILOT's exps/lae.json with tuned_epoch 2, num_freeze_epochs 1, init_lr 1e-4, batch_size 4, ema_decay 0.5"]


def pilot_run(learner: str, folder: Path, broken: str, tasks: int) -> Run:
    raw = {"model_name": learner, "dataset": "synthetic", "init_cls": 2, "increment": 2, "seed": [1],
           "backbone_type": "vit_tiny_patch16_224", "pretrained": False, "backbone_args": TINY_VIT,
           "log_dir": str(folder / "logs"), "progress": False, "device": ["cpu"], "train_per_class": TRAIN_PER_CLASS,
           "test_per_class": TEST_PER_CLASS, "max_tasks": tasks, "memory_size": MEMORY_SIZE, **SETTINGS,
           **({"T": 2} if learner == "icarl" else {})}
    if broken == "kd_temperature" and learner == "icarl":
        raw["T"] = 1
    with warnings.catch_warnings():  # the late-milestone warnings are not news here
        warnings.simplefilter("ignore")
        return Run(build_config(raw))


class Bank:
    """The stream's images of one source (``train`` or ``test``) by source index, through pilot's eval transform;
    with ``augment`` (P1), a shuffled loader's images are instead drawn through pilot's train transform from one
    seed per (task, epoch, image): the same crops and flips for the same image, whichever code asks."""

    def __init__(self, run: Run, part: str, augment: bool = False):
        splits = [getattr(t, part) for t in run.stream.tasks]
        ids = np.concatenate([split.indices for split in splits])
        self.size, self.source = len(splits[0].source), splits[0].source
        self.rows = {int(i): row for row, i in enumerate(ids)}
        self.images = torch.cat([run.ctx.encode(lambda images: images, split) for split in splits])
        self.train_transform = run.ctx.train_transform() if augment else None

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.images[torch.tensor([self.rows[int(i)] for i in ids], dtype=torch.long)]

    def augmented(self, ids: np.ndarray, task: int, epoch: int) -> torch.Tensor:
        images = []
        for i in ids:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((1000 * task + epoch) * self.size + int(i))
                images.append(self.train_transform(self.source.load(int(i))))
        return torch.stack(images)


class Batches:
    """One task's batches, re-ordered each epoch (each time it is iterated) by one random key per source index:
    the same order (and under P1 the same augmentation) for the same images, whichever code asks."""

    def __init__(self, ids: np.ndarray, labels: np.ndarray, images: Bank, batch_size: int, task: int,
                 shuffle: bool, pilots: bool = False, train_mode: bool = True):
        self.ids, self.labels, self.images = np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64), images
        self.batch_size, self.task, self.shuffle, self.epoch = batch_size, task, shuffle, 0
        self.pilots = pilots  # pilot's loop reads (images, labels, positions), PILOT's (positions, images, labels)
        self.train_mode = train_mode  # PILOT's mode "train" (its train transform); "test" loaders are never augmented

    def __len__(self) -> int:
        return -(-len(self.ids) // self.batch_size)

    def __iter__(self):
        order, epoch = np.arange(len(self.ids)), self.epoch
        augment = self.shuffle and self.train_mode and self.images.train_transform is not None
        if self.shuffle:
            keys = torch.rand(self.images.size, generator=torch.Generator().manual_seed(
                1000 * self.task + self.epoch)).numpy()
            order = np.argsort(keys[self.ids], kind="stable")
            self.epoch += 1
        for start in range(0, len(order), self.batch_size):
            rows = order[start: start + self.batch_size]
            positions = torch.from_numpy(rows)
            images = (self.images.augmented(self.ids[rows], self.task, epoch) if augment
                      else self.images[torch.from_numpy(self.ids[rows])])
            labels = torch.from_numpy(self.labels[rows])
            yield (images, labels, positions) if self.pilots else (positions, images, labels)


class FakeDataset:
    """PILOT's ``DummyDataset`` without its transform: ``images`` are sample ids into ``bank``; ``train_mode``: PILOT
    asked for its train transform (``mode="train"``), so its shuffled batches are augmented on P1."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, bank: Bank, train_mode: bool = True):
        self.images, self.labels, self.bank, self.train_mode = images, labels, bank, train_mode

    def __len__(self) -> int:
        return len(self.images)


class FakeDataManager:
    """PILOT's ``DataManager`` over fixed tensors: per source, the ids and labels of pilot's splits (task order,
    within a class pilot's split order), and a bank of eval-transformed images indexed by id."""

    def __init__(self, run: Run, banks: dict[str, Bank]):
        self.banks, self.sizes = banks, [len(t.classes) for t in run.stream.tasks]
        self.rows = {part: (np.concatenate([getattr(t, part).indices for t in run.stream.tasks]),
                            np.concatenate([getattr(t, part).labels for t in run.stream.tasks]))
                     for part in ("train", "test")}

    def get_task_size(self, task: int) -> int:
        return self.sizes[task]

    def get_dataset(self, indices, source, mode, appendent=None, ret_data=False):
        ids, labels = self.rows[source]
        data = [ids[labels == c] for c in indices]
        targets = [labels[labels == c] for c in indices]
        if appendent is not None and len(appendent) != 0:
            data.append(np.asarray(appendent[0], dtype=np.int64))
            targets.append(np.asarray(appendent[1], dtype=np.int64))
        data = np.concatenate(data) if data else np.zeros(0, np.int64)
        targets = np.concatenate(targets) if targets else np.zeros(0, np.int64)
        dataset = FakeDataset(data, targets, self.banks[source], mode == "train")
        return (data, targets, dataset) if ret_data else dataset


class Schedule:
    """Which task is training (it keys both codes' shuffled order); ``loader`` is the DataLoader PILOT's modules get."""

    task = 0

    def loader(self, dataset: FakeDataset, batch_size: int = 1, shuffle: bool = False, **_):
        return Batches(dataset.images, dataset.labels, dataset.bank, batch_size, self.task, shuffle,
                       train_mode=dataset.train_mode)


def image_banks(run: Run, augment: bool = False) -> dict[str, Bank]:
    """Per source, every image of the stream's tasks through pilot's eval transform, by source index; ``augment``:
    shuffled training batches through pilot's train transform."""
    return {"train": Bank(run, "train", augment), "test": Bank(run, "test")}


def p1_overrides(learner: str) -> dict:
    """What pilot's side lays over ``exps/<learner>_p1.json``: for a learner with a PILOT profile
    (``exps/reproduce/pilot/<learner>.json``) exactly what ``tools/reproduce.py`` lays over it for its ``pilot``
    column (``profile_overrides``: the profile's keys that differ from PILOT's config, protocol keys left to P1);
    for iCaRL and DER (no profile) PILOT's transforms alone."""
    from reproduce import profile_overrides
    return profile_overrides(learner, "pilot") or {"preprocess": "pilot"}


def p1_run_config(learner: str, folder: Path, settings: dict | None = None):
    """pilot's ``exps/<learner>_p1.json`` with ``p1_overrides`` (PILOT's transforms, the PILOT profile), DeiT-Tiny
    and CIFAR-100 from PILOT_WEIGHTS_DIR and PILOT_DATA_DIR; ``settings`` (``--set``, a cut-down trial) last."""
    from pilot.config import load_raw
    local = {"log_dir": str(folder / "logs"), "progress": False, "device": ["cpu"]}
    with warnings.catch_warnings():  # the late-milestone and batch-wise warnings are not news here
        warnings.simplefilter("ignore")
        return build_config(load_raw(ROOT / "exps" / f"{learner}_p1.json"),
                            {**p1_overrides(learner), **local, **(settings or {})})


def p1_run(learner: str, folder: Path, settings: dict | None = None) -> Run:
    """The run of ``p1_run_config``."""
    return Run(p1_run_config(learner, folder, settings))


def p1_args(learner: str, run: Run | None = None, settings: dict | None = None) -> dict:
    """PILOT's ``exps/<learner>.json`` with pilot's P1 keys laid over it, as ``tools/lamda_pilot.py`` runs PILOT;
    with ``run``, the counts PILOT's trainer adds from its data manager (``nb_classes``: the dataset's 100, which
    sizes the prompt learners' heads; ``nb_tasks``: all 10 tasks, not P1's 3); ``settings`` (``--set``) last."""
    import models.base
    from lamda_pilot import p1_config
    source = Path(models.base.__file__).resolve().parents[1]
    counts = {"nb_classes": run.stream.dataset.num_classes, "nb_tasks": run.stream.planned_tasks} if run else {}
    return {**p1_config(source, learner, Path()), "device": ["cpu"], **counts, **(settings or {})}


def official_learner(learner: str, run: Run, schedule: Schedule, patches: contextlib.ExitStack,
                     args: dict | None = None):
    """PILOT's Learner of ``learner`` around a copy of pilot's untrained backbone, on the CPU (``args``: PILOT's
    config; the tiny settings if None)."""
    import models.base
    import models.der
    import models.icarl
    import utils.inc_net as inc_net

    backbone = copy.deepcopy(run.ctx.backbone)
    backbone.out_dim = run.ctx.backbone.feature_dim
    args = args or {"model_name": learner, "backbone_type": "vit_tiny_patch16_224", "device": ["cpu"],
                    "memory_size": MEMORY_SIZE, "memory_per_class": 0, "fixed_memory": False, "init_cls": 2,
                    "increment": 2, "T": 2, **SETTINGS}
    # DERNet calls it in every update_fc; patched for the check's duration (later checks use PILOT's own)
    patches.enter_context(mock.patch.object(inc_net, "get_backbone", lambda *_: copy.deepcopy(backbone)))
    official = (models.icarl if learner == "icarl" else models.der).Learner(args)
    for module in (models.base, models.icarl, models.der):
        module.DataLoader = schedule.loader
    return official


def record_draws(official, learner: str) -> dict:
    """Wrap ``update_fc``: what it drew is kept in the returned dict (rows, and DER's new columns and aux head)."""
    drawn = {}
    network = official._network
    update_fc = network.update_fc

    def recording(total):
        old = network.fc.out_features if network.fc is not None else 0
        update_fc(total)
        drawn.clear()
        drawn.update(known=old, weight=network.fc.weight.detach().clone(), bias=network.fc.bias.detach().clone())
        if learner == "der":
            drawn.update(width=network.out_dim, aux_weight=network.aux_fc.weight.detach().clone(),
                         aux_bias=network.aux_fc.bias.detach().clone())

    network.update_fc = recording
    return drawn


def copy_draws(run: Run, learner: str, task, drawn: dict) -> None:
    """Give pilot's learner the entries PILOT drew for ``task``: iCaRL's new head rows; DER's new rows, the old
    rows' columns on the new branch, and the auxiliary head."""
    ours = run.learner
    with torch.no_grad():
        if learner == "icarl":
            head = ours.net["heads"][task.index]
            head.weight.copy_(drawn["weight"][task.num_old:])
            head.bias.copy_(drawn["bias"][task.num_old:])
            return
        head, known, width = ours.net["head"], drawn["known"], drawn["width"]
        head.weight[known:] = drawn["weight"][known:]
        head.bias[known:] = drawn["bias"][known:]
        if known:
            head.weight[:known, -width:] = drawn["weight"][:known, -width:]
            ours.aux_head.weight.copy_(drawn["aux_weight"])
            ours.aux_head.bias.copy_(drawn["aux_bias"])


def largest(pairs) -> tuple[str, float, float]:
    """(name, |difference|, relative difference) of the pair with the largest relative difference."""
    worst = ("", 0.0, 0.0)
    for name, ours, theirs in pairs:
        ours, theirs = ours.detach().double(), torch.as_tensor(theirs).detach().double()
        if ours.shape != theirs.shape:
            return name, float("inf"), float("inf")
        absolute = float((ours - theirs).abs().max()) if ours.numel() else 0.0
        relative = absolute / max(float(theirs.abs().max()) if theirs.numel() else 0.0, 1e-12)
        if relative >= worst[2]:
            worst = (name, absolute, relative)
    return worst


def our_branches(run: Run, learner: str) -> list:
    return [run.ctx.backbone] if learner == "icarl" else list(run.learner.net["branches"].members)


def their_branches(official, learner: str) -> list:
    return [official._network.backbone] if learner == "icarl" else list(official._network.backbones)


def our_head(run: Run, learner: str, task) -> tuple[torch.Tensor, torch.Tensor]:
    if learner == "icarl":
        heads = run.learner.net["heads"][: task.index + 1]
        return torch.cat([h.weight for h in heads]), torch.cat([h.bias for h in heads])
    return run.learner.net["head"].weight, run.learner.net["head"].bias


def accuracy(predictions: torch.Tensor, labels: np.ndarray) -> float:
    return round(100.0 * float((predictions.numpy() == labels).mean()), 2)


def curves(reports: list[dict]) -> dict:
    """Each side's CNN and NME accuracy after every task, and their averages (Ā)."""
    out = {}
    for key in ("cnn_accuracy", "cnn_accuracy_ours", "nme_accuracy", "nme_accuracy_ours"):
        curve = [t[key] for t in reports]
        out[key.replace("accuracy", "curve")] = curve
        out[key.replace("accuracy", "average")] = round(sum(curve) / len(curve), 2)
    return out


def compare_task(run: Run, official, learner: str, task, banks, initial) -> dict:
    ours = run.learner
    seen = run.stream.tasks[: task.index + 1]
    run.ctx.open_evaluation(seen)
    test_ids = np.concatenate([t.test.indices for t in seen])
    test_labels = np.concatenate([t.test.labels for t in seen])
    if learner == "icarl":
        both = [ours.both_logits(t.test) for t in seen]
        our_cnn, our_nme = torch.cat([b["cnn"] for b in both]), torch.cat([b["nme"] for b in both])
        our_means = ours.class_means
    else:
        our_cnn = torch.cat([ours.predict(t.test) for t in seen])
        run.ctx.open_fit(task)
        exemplars = run.ctx.memory.split()
        our_means = exemplar_means(ours.memory_features(exemplars), torch.from_numpy(exemplars.labels), task.num_seen)
        run.ctx.open_evaluation(seen)
        features = torch.cat([run.ctx.encode(ours.features, t.test) for t in seen])
        our_nme = nme_logits(features, our_means)
    network = official._network.eval()
    with torch.no_grad():
        their_cnn = network(banks["test"][torch.from_numpy(test_ids)])["logits"]
    their_nme, _ = official._eval_nme(Batches(test_ids, test_labels, banks["test"], 64, task.index, False),
                                      official._class_means)
    parameters = [(f"branch{b}.{name}", mine, theirs)
                  for b, (branch, official_branch) in enumerate(zip(our_branches(run, learner),
                                                                     their_branches(official, learner)))
                  for name, mine in branch.named_parameters()
                  for theirs in [dict(official_branch.named_parameters()).get(name, torch.full((0,), 0.0))]]
    if len(our_branches(run, learner)) != len(their_branches(official, learner)):
        parameters.append(("branch count", torch.zeros(1), torch.zeros(2)))
    weight, bias = our_head(run, learner, task)
    parameters += [("head.weight", weight, official._network.fc.weight), ("head.bias", bias, official._network.fc.bias)]
    indices, labels = run.ctx.memory._flat()
    their_memory = np.asarray(official._data_memory, dtype=np.int64)
    name, absolute, relative = largest(parameters)
    _, mean_diff, _ = largest([("class means", our_means, official._class_means)])
    _, logit_diff, logit_relative = largest([("cnn logits", our_cnn, their_cnn)])
    newest = our_branches(run, learner)[-1]
    moved = largest([(name, mine, start) for (name, mine), start in zip(newest.named_parameters(), initial.parameters())])
    # the largest absolute change training made to the newest branch: the comparison is of trained weights
    report = {"task": task.index + 1, "classes": task.num_seen,
              "newest_branch_moved_by": moved[1],
              "parameters_compared": len(parameters), "worst_parameter": name, "max_parameter_difference": absolute, "max_parameter_relative": relative,
              "head_relative": largest(parameters[-2:])[2],
              "memory_identical": indices.tolist() == their_memory.tolist()
              and labels.tolist() == np.asarray(official._targets_memory, dtype=np.int64).tolist(),
              "memory_ours": indices.tolist(), "memory_pilot": their_memory.tolist(),
              "max_class_mean_difference": mean_diff,
              "max_cnn_logit_difference": logit_diff, "cnn_logit_relative": logit_relative,
              "cnn_predictions_identical": our_cnn.argmax(1).tolist() == their_cnn.argmax(1).tolist(),
              "nme_predictions_identical": our_nme.argmax(1).tolist() == their_nme[:, 0].tolist(),
              "cnn_accuracy": accuracy(their_cnn.argmax(1), test_labels),
              "cnn_accuracy_ours": accuracy(our_cnn.argmax(1), test_labels),
              "nme_accuracy": accuracy(torch.as_tensor(their_nme[:, 0]), test_labels),
              "nme_accuracy_ours": accuracy(our_nme.argmax(1), test_labels)}
    report["agree"] = (relative <= PARAMETER_TOLERANCE and logit_relative <= PARAMETER_TOLERANCE
                       and mean_diff <= PARAMETER_TOLERANCE and report["memory_identical"]
                       and report["cnn_predictions_identical"] and report["nme_predictions_identical"])
    return report


def importable(mirror: Path, folder: Path) -> Path:
    """PILOT at the pinned commit exported into ``folder``, first on sys.path, its one import that timm 1.x moved
    aliased; the source folder."""
    source = export(mirror, COMMIT, folder / "src")
    sys.path.insert(0, str(source))
    import timm.layers.weight_init
    sys.modules.setdefault("timm.models.layers.weight_init", timm.layers.weight_init)
    return source


def same_batches(run: Run, banks: dict[str, Bank], schedule: "Schedule", module=None) -> "FakeDataManager":
    """PILOT's data manager over the image banks, and pilot's train loader giving the same ``Batches`` over a
    split's source indices (the memory appended as PILOT appends it); ``module`` (PILOT's ``models.<learner>``)
    and ``models.base`` get the schedule's ``DataLoader``, so PILOT's loaders give those batches too."""
    if module is not None:
        import models.base
        for patched in (models.base, module):
            patched.DataLoader = schedule.loader
    run.ctx.train_loader = lambda split, batch_size, *_, **__: Batches(
        split.indices, split.labels, banks["train"], batch_size, schedule.task, True, pilots=True)
    return FakeDataManager(run, banks)


def unaugmented_test_mode(data_manager, banks: dict) -> None:
    """PILOT's ``mode="test"`` datasets go through its test transform even when shuffled (APER's
    ``train_loader_for_protonet``): under P1 they get the eval-transformed bank, not the augmented one."""
    plain = copy.copy(banks["train"])
    plain.train_transform = None
    get_dataset = data_manager.get_dataset

    def get_dataset_by_mode(indices, source, mode, appendent=None, ret_data=False):
        out = get_dataset(indices, source, mode, appendent, ret_data)
        if mode == "test" and source == "train":
            (out[-1] if ret_data else out).bank = plain
        return out

    data_manager.get_dataset = get_dataset_by_mode


def check_exemplar_learner(learner: str, broken: str = "", tasks: int = TASKS, protocol: str = "tiny",
                           settings: dict | None = None) -> dict:
    """iCaRL or DER: run both codes (PILOT's importable) on the first ``tasks`` tasks; one report per task.
    ``protocol`` "p1": P1 itself (DeiT-Tiny, CIFAR-100's subset, PILOT's transforms and augmentation, its config;
    ``settings`` laid over both sides, for a cut-down trial)."""
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as patches:
        torch.manual_seed(0)
        run = (p1_run(learner, Path(folder), settings) if protocol == "p1"
               else pilot_run(learner, Path(folder), broken, tasks))
        banks = image_banks(run, augment=protocol == "p1")
        initial = copy.deepcopy(run.ctx.backbone)
        schedule = Schedule()
        torch.manual_seed(1)
        official = official_learner(learner, run, schedule, patches,
                                    p1_args(learner, settings=settings) if protocol == "p1" else None)
        drawn = record_draws(official, learner)
        data_manager = same_batches(run, banks, schedule)
        reports = []
        for task in run.stream.tasks:
            schedule.task = task.index
            torch.manual_seed(10 + task.index)
            official.incremental_train(data_manager)
            if broken != "head_rows":
                begin_task = run.learner.begin_task

                def begin_then_copy(current, begin_task=begin_task):
                    begin_task(current)
                    copy_draws(run, learner, current, drawn)

                run.learner.begin_task = begin_then_copy
            run.ctx.open_fit(task)
            run.learner.fit(task)
            run._update_memory(task)
            run.learner.__dict__.pop("begin_task", None)
            reports.append(compare_task(run, official, learner, task, banks, initial))
            print(json.dumps({k: v for k, v in reports[-1].items() if not k.startswith("memory_")}), flush=True)
            official.after_task()
        run.ctx.access.open()
    return {"learner": learner, "protocol": protocol, "tasks": reports, **curves(reports),
            "agree": all(t["agree"] for t in reports)}


# --- the PILOT-profile learners: SimpleCIL and RanPAC (issue 21) ------------------------------------------------------

PROMPT_SETTINGS = {"tuned_epoch": 2, "init_lr": 0.01, "batch_size": 4}  # the rest as PILOT's exps/<learner>.json
PROFILE_SETTINGS = {  # PILOT's exps/<learner>.json training keys at small values, on both sides (the rest: the
    "simplecil": {},  # profile on pilot's side, PILOT's own json or the same keys on PILOT's)
    "ranpac": {"tuned_epoch": 2, "init_lr": 0.1, "batch_size": 4, "M": 48, "ffn_num": 8},
    "l2p": PROMPT_SETTINGS, "dualprompt": PROMPT_SETTINGS,
    # init_lr 1 (RanPAC's 0.1 moves the adapters, up-projection drawn at 0, 12x less): APER's two branches then
    # differ by 4e-3 relative (--break pretrained_branch), well above the tolerance
    "fecam": {"tuned_epoch": 2, "init_lr": 1.0, "batch_size": 4, "ffn_num": 8},
    "aper_adapter": {"tuned_epoch": 2, "init_lr": 1.0, "batch_size": 4, "ffn_num": 8},
    # one frozen and one training epoch in every task; ema_decay 0.5 so that the offline PET visibly follows;
    # init_lr 1e-4 (PILOT's 2.8e-3 moves the PET 10x its U(0, 0.01) draw in 3 steps and Adam then amplifies the
    # two codes' rounding to 1e-2 relative; with SGD at lr 0.3 both agree to 2e-6 relative after moves of 0.9)
    "lae": {"tuned_epoch": 2, "num_freeze_epochs": 1, "init_lr": 1e-4, "batch_size": 4, "ema_decay": 0.5}}
DEPTH = {"dualprompt": 5,  # DualPrompt's G-prompts in blocks 0-1 and E-prompts in 2-4, as PILOT's exps/dualprompt.json
         "lae": 5}  # PILOT's LAE net puts prefixes in blocks 0-4 (hard-coded adapt_blocks)


def profile_keys(learner: str) -> dict:
    """The method keys of ``exps/reproduce/pilot/<learner>.json`` (what makes pilot do what PILOT does), without
    the protocol keys ``tools/reproduce.py`` leaves to the protocol."""
    from pilot.config import load_raw
    from reproduce import PROTOCOL_KEYS
    raw = load_raw(ROOT / "exps" / "reproduce" / "pilot" / f"{learner}.json")
    return {k: v for k, v in raw.items() if k not in PROTOCOL_KEYS and not k.startswith("_")}


def profile_run(learner: str, folder: Path, tasks: int) -> Run:
    from pilot.config import load_raw
    # the profile's learner: aper_vpt_deep and aper_vpt_shallow are both aper_vpt
    model_name = load_raw(ROOT / "exps" / "reproduce" / "pilot" / f"{learner}.json")["model_name"]
    raw = {**profile_keys(learner), "model_name": model_name, "dataset": "synthetic", "init_cls": 2, "increment": 2,
           "seed": [1], "backbone_type": "vit_tiny_patch16_224", "pretrained": False,
           "backbone_args": {**TINY_VIT, "depth": DEPTH.get(learner, TINY_VIT["depth"])},
           "log_dir": str(folder / "logs"), "progress": False, "device": ["cpu"], "train_per_class": TRAIN_PER_CLASS,
           "test_per_class": TEST_PER_CLASS, "max_tasks": tasks, **PROFILE_SETTINGS[learner]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Run(build_config(raw))


def pilots_own_args(learner: str, run: Run) -> dict:
    """PILOT's own ``exps/<learner>.json`` with the small training keys, on the CPU, over the tiny stream."""
    import models.base
    from pilot.config import load_raw
    source = Path(models.base.__file__).resolve().parents[1]
    return {**load_raw(source / "exps" / f"{learner}.json"), **PROFILE_SETTINGS[learner], "device": ["cpu"],
            "nb_classes": sum(len(t.classes) for t in run.stream.tasks), "init_cls": 2, "increment": 2}


def official_args(learner: str, run: Run) -> dict:
    settings = {**profile_keys(learner), **PROFILE_SETTINGS[learner]}
    suffix = "_adapter" if learner in ("ranpac", "fecam", "aper_adapter") else ""
    return {**settings, "model_name": learner, "backbone_type": f"pretrained_vit_b16_224{suffix}", "device": ["cpu"],
            "memory_size": 0, "memory_per_class": 0, "fixed_memory": False, "init_cls": 2, "increment": 2,
            "nb_classes": sum(len(t.classes) for t in run.stream.tasks)}


def vit_size(run: Run) -> dict:
    """The size of pilot's timm ViT (the tiny random one, or DeiT-Tiny on P1) as PILOT's VisionTransformer classes
    take it: what PILOT's ViT-Ti builders (``vit_tiny_patch16_224_l2p`` ...) pass, at P1 224 / 16 / 192 / 12 / 3."""
    vit = run.ctx.backbone.model
    return {"img_size": vit.patch_embed.img_size[0], "patch_size": vit.patch_embed.patch_size[0],
            "embed_dim": vit.embed_dim, "depth": len(vit.blocks), "num_heads": vit.blocks[0].attn.num_heads}


def split_qkv(state: dict, dim: int) -> dict:
    """timm's ViT weights in the layout of PILOT's adapter ViTs (``vit_adapter``, ``vit_mos``): qkv split into
    q/k/v_proj, ``mlp.fc*`` renamed ``fc*``, as their ``vit_base_patch16_224_*`` functions load ViT-B/16."""
    split = {}
    for key, value in state.items():
        if ".qkv." in key:
            for part, chunk in zip("qkv", value.split(dim)):
                split[key.replace("qkv", f"{part}_proj")] = chunk
        else:
            split[key.replace("mlp.", "")] = value
    return split


def side_by_side(official, ours, seen: list, banks: dict) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.nn.Module]:
    """The seen tasks' test labels and images, pilot's logits on them, and PILOT's network in eval mode."""
    test_labels = np.concatenate([t.test.labels for t in seen])
    images = banks["test"][torch.from_numpy(np.concatenate([t.test.indices for t in seen]))]
    return test_labels, images, torch.cat([ours.predict(t.test) for t in seen]), official._network.eval()


def adapter_vit(run: Run, args: dict) -> torch.nn.Module:
    """PILOT's ``backbone/vit_adapter.py`` VisionTransformer at pilot's ViT's size, loaded with its weights the way
    ``vit_base_patch16_224_adapter`` loads ViT-B/16 (qkv split into q/k/v, ``mlp.fc*`` renamed, everything but the
    adapters frozen), with the adapter settings of ``utils/inc_net.py``'s ``get_backbone`` (in a SimpleNamespace:
    the blocks read them as attributes, as from its EasyDict; easydict is not installed here)."""
    from functools import partial
    from types import SimpleNamespace

    from backbone import vit_adapter
    size = vit_size(run)
    dim = size["embed_dim"]
    tuning = SimpleNamespace(ffn_adapt=True, ffn_option="parallel", ffn_adapter_layernorm_option="none",
                             ffn_adapter_init_option="lora", ffn_adapter_scalar="0.1", ffn_num=args["ffn_num"],
                             d_model=dim, vpt_on=False, vpt_num=0)
    model = vit_adapter.VisionTransformer(
        **size, mlp_ratio=4, qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_classes=0, global_pool=False, drop_path_rate=0.0,
        tuning_config=tuning)
    missing = model.load_state_dict(split_qkv(run.ctx.backbone.model.state_dict(), dim), strict=False).missing_keys
    assert all(".adaptmlp." in key for key in missing), missing  # every ViT weight loaded
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name in missing
    model.out_dim = dim
    return model.eval()


def no_adapter_dropout(official, run: Run) -> None:
    """Both codes' adapters drop 10% of the bottleneck while training: independent random masks; 0 on both sides."""
    for block in official._network.backbone.blocks:
        block.adaptmlp.dropout = 0.0
    for unit in run.learner.net["adaptation"].units:
        unit.dropout.p = 0.0


def copy_adapters(official, run: Run, broken: str) -> None:
    """PILOT's freshly drawn adapters into pilot's (``--break adapter_scale``: pilot's scale 0.2 instead of 0.1)."""
    with torch.no_grad():
        for block, unit in zip(official._network.backbone.blocks, run.learner.net["adaptation"].units):
            for ours, theirs in ((unit.down, block.adaptmlp.down_proj), (unit.up, block.adaptmlp.up_proj)):
                ours.weight.copy_(theirs.weight)
                ours.bias.copy_(theirs.bias)
            if broken == "adapter_scale":
                unit.scale = 0.2


def adapter_set_pairs(name: str, ours, theirs) -> list:
    """(name, pilot's, PILOT's) per adapter tensor of one adapter set: pilot's AdapterSet, PILOT's adapters (its
    AdaptFormer ``Adapter`` modules, block by block)."""
    return [(f"{name}{i}.{mine}.{kind}", getattr(getattr(unit, mine), kind), getattr(getattr(adapter, other), kind))
            for i, (unit, adapter) in enumerate(zip(ours.units, theirs))
            for mine, other in (("down", "down_proj"), ("up", "up_proj")) for kind in ("weight", "bias")]


def adapter_pairs(official, run: Run, adapted: torch.nn.Module | None = None) -> list:
    """``adapter_set_pairs`` of the adapter ViT; ``adapted``: PILOT's adapter ViT where it is no longer
    ``_network.backbone`` (APER's dual-branch network)."""
    blocks = (adapted or official._network.backbone).blocks
    return adapter_set_pairs("adapter", run.learner.net["adaptation"], [block.adaptmlp for block in blocks])


def both_trained(run: Run, official, schedule: Schedule, data_manager, between=None):
    """Each task: PILOT's learner trains on it, then (after ``between(task)``, if given) pilot's; yields the task and
    the tasks seen so far, pilot's evaluation of them open."""
    for task in run.stream.tasks:
        schedule.task = task.index
        torch.manual_seed(10 + task.index)
        official.incremental_train(data_manager)
        if between:
            between(task)
        run.ctx.open_fit(task)
        run.learner.fit(task)
        seen = run.stream.tasks[: task.index + 1]
        run.ctx.open_evaluation(seen)
        yield task, seen


def share_first_head(official, ours, drawn: dict, before_end=None) -> None:
    """The adapting learners' task-1 cosine head: PILOT's draw copied into pilot's when the first task begins; both
    trained heads (and sigmas) recorded in ``drawn`` once trained, before prototypes, branches or a projection
    replace them; ``before_end`` runs just before pilot's ``end_task``."""
    update_fc, init_train = official._network.update_fc, official._init_train
    begin_task, end_task = ours.begin_task, ours.end_task

    def recording_update_fc(total):
        update_fc(total)
        drawn.setdefault("head", official._network.fc.weight.detach().clone())

    def recording_init_train(*loaders):
        init_train(*loaders)
        drawn.update(trained_head=official._network.fc.weight.detach().clone(),
                     sigma=official._network.fc.sigma.detach().clone())

    def begin_then_copy(task):
        begin_task(task)
        if task.index == 0:
            with torch.no_grad():
                ours.net["head"].weight.copy_(drawn["head"])

    def end_after_recording(task):
        if ours.adapting:
            drawn.update(our_trained_head=ours.net["head"].weight.detach().clone(),
                         our_sigma=ours.net["head"].sigma.detach().clone())
        if before_end:
            before_end()
        end_task(task)

    official._network.update_fc, official._init_train = recording_update_fc, recording_init_train
    ours.begin_task, ours.end_task = begin_then_copy, end_after_recording


def aligned_split(run: Run, schedule: Schedule):
    """pilot's ``split_fit_val`` with PILOT's split: PILOT fits the ridge on the first 80% of the features its
    shuffled ``train_loader_for_protonet`` yields (the ``Batches`` order of the task's first epoch), so the same
    samples fit and validate on both sides."""
    def split(features, labels, fit_fraction=0.8, seed=0):
        ids = run.stream.tasks[schedule.task].train.indices
        keys = torch.rand(len(run.stream.tasks[0].train.source),  # as Batches draws them, epoch 0
                          generator=torch.Generator().manual_seed(1000 * schedule.task)).numpy()
        order = torch.from_numpy(np.argsort(keys[ids], kind="stable"))
        fit, val = order[: int(len(features) * fit_fraction)], order[int(len(features) * fit_fraction):]
        return features[fit], labels[fit], features[val], labels[val]
    return split


def profile_report(task, parameters: list, their_logits: torch.Tensor, our_logits: torch.Tensor,
                   test_labels: np.ndarray, extra: dict, tolerance: float = PARAMETER_TOLERANCE) -> dict:
    name, absolute, relative = largest(parameters)
    _, logit_diff, logit_relative = largest([("logits", our_logits, their_logits)])
    report = {"task": task.index + 1, "classes": task.num_seen, "parameters_compared": len(parameters),
              "worst_parameter": name, "max_parameter_difference": absolute, "max_parameter_relative": relative,
              "max_logit_difference": logit_diff, "logit_relative": logit_relative,
              "predictions_identical": our_logits.argmax(1).tolist() == their_logits.argmax(1).tolist(),
              "accuracy_pilot": 100.0 * float((their_logits.argmax(1).numpy() == test_labels).mean()),
              "accuracy_ours": 100.0 * float((our_logits.argmax(1).numpy() == test_labels).mean()), **extra}
    report["agree"] = (relative <= tolerance and logit_relative <= PARAMETER_TOLERANCE
                       and report["predictions_identical"] and extra.get("lambda_identical", True))
    return report


def check_profile_learner(learner: str, broken: str = "", tasks: int = TASKS, protocol: str = "tiny",
                          settings: dict | None = None) -> dict:
    """SimpleCIL or RanPAC under pilot's PILOT profile beside PILOT's ``models/<learner>.py`` (on P1 PILOT's
    config as ``tools/lamda_pilot.py`` runs it; RanPAC's adapter dropout off on both sides, as in the tiny check)."""
    import utils.inc_net as inc_net
    module = __import__(f"models.{learner}", fromlist=["Learner"])
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as patches:
        run, banks, args = profile_setup(learner, Path(folder), tasks, protocol, settings)
        if protocol == "tiny":
            args = official_args(learner, run)
        schedule = Schedule()
        torch.manual_seed(1)
        if learner == "ranpac":
            patches.enter_context(mock.patch.object(inc_net, "get_backbone", lambda *_: adapter_vit(run, args)))
        else:
            backbone = copy.deepcopy(run.ctx.backbone).eval()
            backbone.out_dim = run.ctx.backbone.feature_dim
            patches.enter_context(mock.patch.object(inc_net, "get_backbone", lambda *_: backbone))
        official = module.Learner(args)
        data_manager = same_batches(run, banks, schedule, module)
        drawn, lambdas, exact = {}, [], {}
        if learner == "ranpac":
            import pilot.learners.ranpac as ours_module
            patches.enter_context(mock.patch.object(ours_module, "split_fit_val", aligned_split(run, schedule)))
            select_lambda, our_lambdas = ours_module.select_lambda, []

            def selecting_pilots_lambda(*split):  # pilot's own choice is recorded, PILOT's is used
                our_lambdas.append(select_lambda(*split))
                return lambdas[-1]

            patches.enter_context(mock.patch.object(ours_module, "select_lambda", selecting_pilots_lambda))
            no_adapter_dropout(official, run)
            copy_adapters(official, run, broken)
            initial_adapters = [p.detach().clone() for _, p, _ in adapter_pairs(official, run)]
            optimise = official.optimise_ridge_parameter

            def recording_optimise(features, targets):  # also PILOT's G and Q accumulated in float64
                features, targets = features.double(), targets.double()
                exact["G"] = exact.get("G", 0) + features.T @ features
                exact["Q"] = exact.get("Q", 0) + features.T @ targets
                lambdas.append(float(optimise(features.float(), targets.float())))
                exact.setdefault("lambdas", []).append(float(optimise(features, targets)))  # its rule in float64
                return lambdas[-1]

            official.optimise_ridge_parameter = recording_optimise
            ours = run.learner

            def pilots_projection():  # PILOT's draw (setup_RP, after its training)
                with torch.no_grad():
                    ours.projection.weight.copy_(official.W_rand)

            share_first_head(official, ours, drawn, pilots_projection)
        elif broken == "prototype_images":
            classifier = run.learner.classifier
            add_classes = classifier.add_classes

            def without_last_image(features, labels, classes):
                keep = torch.ones(len(labels), dtype=torch.bool)
                for c in classes:
                    keep[torch.nonzero(labels == c)[-1]] = False
                add_classes(features[keep], labels[keep], classes)

            classifier.add_classes = without_last_image
        reports = []
        for task, seen in both_trained(run, official, schedule, data_manager):
            test_ids = np.concatenate([t.test.indices for t in seen])
            test_labels = np.concatenate([t.test.labels for t in seen])
            ours_logits = torch.cat([run.learner.predict(t.test) for t in seen])
            network = official._network.eval()
            with torch.no_grad():
                their_logits = network(banks["test"][torch.from_numpy(test_ids)])["logits"][:, : task.num_seen]
            their_rows = official._network.fc.weight[: task.num_seen]
            if learner == "simplecil":
                parameters = [("prototypes", run.learner.classifier.prototypes, their_rows)]
                extra = {}
            else:
                readout = run.learner.readout.T[: task.num_seen]
                adapters = adapter_pairs(official, run)
                head = [("task-1 head.weight", drawn["our_trained_head"], drawn["trained_head"]),
                        ("task-1 head.sigma", drawn["our_sigma"], drawn["sigma"])]
                parameters = [("readout W_o", readout, their_rows)] + adapters + head
                # PILOT accumulates and solves in float32: its own projected features, in float64, show what
                # that rounding moves (G has rank <= the images seen, below M, so lambda alone conditions it)
                eye = torch.eye(exact["G"].shape[0], dtype=torch.float64)
                largest_eigenvalue = float(torch.linalg.eigvalsh(exact["G"])[-1])
                solved = torch.linalg.solve(exact["G"] + lambdas[-1] * eye, exact["Q"]).T
                # what PILOT's cosine head gives on pilot's readout: isolates the head's form
                features = run.learner.project(torch.cat([run.learner.adapted_features(t.test) for t in seen]))
                cosine = drawn["sigma"] * torch.nn.functional.linear(
                    torch.nn.functional.normalize(features.float(), dim=1),
                    torch.nn.functional.normalize(readout.float(), dim=1))
                # the largest change training made to pilot's adapters: the comparison is of trained weights
                moved = largest([(n, mine, start) for (n, mine, _), start in zip(adapters, initial_adapters)])[1]
                training = {"adapters_moved_by": moved, "adapters_relative": largest(adapters)[2],
                            "task1_head_relative": largest(head)[2],
                            "readout_relative_to_float64_solve": largest([("", readout, solved[: task.num_seen])])[2],
                            "ridge_condition": (largest_eigenvalue + lambdas[-1]) / lambdas[-1],
                            "features_relative": largest([("", features.float(), torch.relu(network.backbone(
                                banks["test"][torch.from_numpy(test_ids)]) @ official.W_rand))])[2],
                            "lambda_ours": our_lambdas[-1], "lambda_pilot": lambdas[-1],
                            "lambda_pilot_rule_in_float64": exact["lambdas"][-1]}
                training["training_agrees"] = (training["adapters_relative"] <= PARAMETER_TOLERANCE
                                               and training["task1_head_relative"] <= PARAMETER_TOLERANCE
                                               and training["readout_relative_to_float64_solve"] <= READOUT_TOLERANCE)
                extra = {**training, "lambda_identical": training["lambda_ours"] == training["lambda_pilot"],
                         "cosine_on_our_readout_predictions_identical":
                             cosine.argmax(1).tolist() == their_logits.argmax(1).tolist(),
                         "cosine_on_our_readout_logit_relative": largest([("", cosine, their_logits)])[2]}
            reports.append(profile_report(task, parameters, their_logits, ours_logits, test_labels, extra))
            announce(protocol, learner, reports[-1])
            official.after_task()
        run.ctx.access.open()
    return profile_result(learner, protocol, reports)


# --- L2P under the PILOT profile (issue 21) ---------------------------------------------------------------------------


def prompt_vits(learner: str, run: Run, args: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    """PILOT's ``backbone/vit_l2p.py`` (``vit_dualprompt.py``) VisionTransformer at pilot's ViT's size, with the
    prompts ``utils/inc_net.py``'s ``get_backbone`` asks for, and the un-prompted one ``get_original_backbone``
    builds; both load its weights (P1: DeiT-Tiny's) through PILOT's ``checkpoint_filter_fn`` (L2P's
    ``resize_pos_embed`` gives every prompt token the [CLS] position embedding), as ``build_model_with_cfg`` loads
    ViT-B/16."""
    from backbone import vit_dualprompt, vit_l2p
    vit_module = vit_l2p if learner == "l2p" else vit_dualprompt
    timm_vit = run.ctx.backbone.model
    size = {**vit_size(run), "num_classes": args["nb_classes"], "drop_rate": args["drop"],
            "drop_path_rate": args["drop_path"]}
    prompts = dict(prompt_length=args["length"], embedding_key=args["embedding_key"],
                   prompt_init=args["prompt_key_init"], prompt_pool=args["prompt_pool"], prompt_key=args["prompt_key"],
                   pool_size=args["size"], top_k=args["top_k"], batchwise_prompt=args["batchwise_prompt"],
                   prompt_key_init=args["prompt_key_init"], head_type=args["head_type"],
                   use_prompt_mask=args["use_prompt_mask"])
    if learner == "dualprompt":
        prompts.update({key: args[key] for key in (
            "use_g_prompt", "g_prompt_length", "g_prompt_layer_idx", "use_prefix_tune_for_g_prompt", "use_e_prompt",
            "e_prompt_layer_idx", "use_prefix_tune_for_e_prompt", "same_key_value")})
    prompted = vit_module.VisionTransformer(**size, **prompts)
    original = vit_module.VisionTransformer(**size)
    for model in (prompted, original):
        missing = model.load_state_dict(vit_module.checkpoint_filter_fn(timm_vit.state_dict(), model), strict=False)
        assert all(k.startswith(("head.", "prompt.", "e_prompt.", "g_prompt")) for k in missing.missing_keys), missing
    return prompted, original.eval()


def kv_layout_fixed(forward):
    """PILOT's ``EPrompt.forward`` with its prefix layout fixed (``--official-fix prefix_layout``, a diagnosis, not
    PILOT's behaviour): ``backbone/prompt.py`` line 321-325 takes ``self.prompt[:, :, idx]``, [layers, 2, B, top_k,
    length, heads, D / heads], and *reshapes* it to [layers, B, 2, ...] without moving the axes, so a batch's
    key/value halves are dealt out over its samples (with one E-prompt for the whole batch, as in training and
    under the batch-wise vote, the first half of a batch gets the key prefix as both key and value, the second half
    the value prefix); here the axes are moved first, which is what pilot's ``PromptPool.select`` does."""
    def fixed(self, x_embed, prompt_mask=None, cls_features=None):
        out = forward(self, x_embed, prompt_mask=prompt_mask, cls_features=cls_features)
        raw = self.prompt[:, :, out["prompt_idx"]]  # layers, 2, B, top_k, length, heads, D / heads
        layers, dual, batch, top_k, length, heads, width = raw.shape
        out["batched_prompt"] = raw.permute(0, 2, 1, 3, 4, 5, 6).reshape(layers, batch, dual, top_k * length, heads, width)
        return out
    return fixed


def prompt_pairs(learner: str, ours, theirs) -> list:
    """(name, pilot's tensor, PILOT's tensor in pilot's layout): prompts, keys, head (pilot's rows: the stream's
    classes; PILOT's the dataset's, 100 on P1, the rest never trained nor read: both mask the logits to those seen)."""
    rows = len(ours.net["head"].weight)
    head = [("head.weight", ours.net["head"].weight, theirs.head.weight[:rows]),
            ("head.bias", ours.net["head"].bias, theirs.head.bias[:rows])]
    if learner == "l2p":  # PILOT [pool, length, D]; pilot [pool, 1 layer, length, D]
        return [("prompts", ours.net["pool"].prompts, theirs.prompt.prompt.unsqueeze(1)),
                ("keys", ours.net["pool"].keys, theirs.prompt.prompt_key)] + head
    # PILOT's prefixes [layers, 2, (pool,) length, heads, D / heads]; pilot's [(pool,) layers, 2, length, D]
    return [("e_prompts", ours.net["e_pool"].prompts, theirs.e_prompt.prompt.flatten(-2).permute(2, 0, 1, 3, 4)),
            ("e_keys", ours.net["e_pool"].keys, theirs.e_prompt.prompt_key),
            ("g_prompts", ours.net["g_prompt"].prompts, theirs.g_prompt.flatten(-2))] + head


def profile_setup(learner: str, folder: Path, tasks: int, protocol: str, settings: dict | None):
    """pilot's run, the image banks and PILOT's args of a PILOT-profile check: ``tiny`` (small training keys on
    both sides) or ``p1`` (P1 itself: ``p1_run`` and ``p1_args``, PILOT's augmentation shared; ``settings`` laid
    over both sides, for a cut-down trial)."""
    torch.manual_seed(0)
    if protocol == "p1":
        run = p1_run(learner, folder, settings)
        return run, image_banks(run, augment=True), p1_args(learner, run, settings)
    run = profile_run(learner, folder, tasks)
    return run, image_banks(run), pilots_own_args(learner, run)


def profile_result(learner: str, protocol: str, reports: list[dict]) -> dict:
    """A check's result; on P1 also both sides' accuracy after every task and its average (Ā)."""
    result = {"learner": learner, "protocol": protocol, "tasks": reports}
    if protocol == "p1":
        for side in ("pilot", "ours"):
            curve = [round(t[f"accuracy_{side}"], 2) for t in reports]
            result.update({f"curve_{side}": curve, f"average_{side}": round(sum(curve) / len(curve), 2)})
        result["curves_identical"] = result["curve_pilot"] == result["curve_ours"]
    return {**result, "agree": all(t["agree"] for t in reports)}


def announce(protocol: str, learner: str, report: dict) -> None:
    """On P1 (tens of minutes) each task's report as it comes (stderr, with PILOT's own prints)."""
    if protocol == "p1":
        print(json.dumps({"learner": learner, **report}), flush=True)


def check_prompt_learner(learner: str, broken: str = "", tasks: int = TASKS, official_fix: str = "",
                         protocol: str = "tiny", settings: dict | None = None) -> dict:
    """L2P or DualPrompt under pilot's PILOT profile beside PILOT's ``models/<learner>.py`` (PILOT with its own
    exps/<learner>.json; on P1 as ``tools/lamda_pilot.py`` runs it)."""
    import utils.inc_net as inc_net
    from pilot.learners._prompt import class_sorted
    module = __import__(f"models.{learner}", fromlist=["Learner"])
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as patches:
        run, banks, args = profile_setup(learner, Path(folder), tasks, protocol, settings)
        schedule = Schedule()
        torch.manual_seed(1)
        prompted, original = prompt_vits(learner, run, args)
        patches.enter_context(mock.patch.object(inc_net, "get_backbone", lambda *_: prompted))
        patches.enter_context(mock.patch.object(inc_net.PromptVitNet, "get_original_backbone", lambda *_: original))
        if official_fix == "prefix_layout":
            from backbone.prompt import EPrompt
            patches.enter_context(mock.patch.object(EPrompt, "forward", kv_layout_fixed(EPrompt.forward)))
        official = module.Learner(args)
        data_manager = same_batches(run, banks, schedule, module)
        ours, theirs = run.learner, official._network.backbone
        with torch.no_grad():  # PILOT's drawn prompts, keys and head into pilot's
            for _, mine, drawn in prompt_pairs(learner, ours, theirs):
                mine.copy_(drawn)
        if broken == "prompt_position":
            ours.config.prompt_position = "none"
        if broken == "shared_prompt_pool":
            ours.config.shared_prompt_pool = False
        initial = [p.detach().clone() for _, p, _ in prompt_pairs(learner, ours, theirs)]
        reports = []
        for task, seen in both_trained(run, official, schedule, data_manager):
            our_logits = torch.cat(ours.predict_tasks([t.test for t in seen]))[:, : task.num_seen]
            union, position = class_sorted([t.test for t in seen])  # PILOT's test order: class-sorted
            network = official._network.eval()
            with torch.no_grad():
                their_sorted = torch.cat([network(images, task_id=task.index)["logits"][:, : task.num_seen]
                                          for _, images, _ in Batches(union.indices, union.labels, banks["test"],
                                                                      args["batch_size"], task.index, False)])
            their_logits = their_sorted[torch.from_numpy(position)]
            test_labels = np.concatenate([t.test.labels for t in seen])
            parameters = prompt_pairs(learner, ours, theirs)
            moved = largest([(n, mine, start) for (n, mine, _), start in zip(parameters, initial)])[1]
            reports.append(profile_report(task, parameters, their_logits, our_logits, test_labels,
                                          {"prompts_moved_by": moved}, ADAM_TOLERANCE))
            announce(protocol, learner, reports[-1])
            official.after_task()
        run.ctx.access.open()
    return profile_result(learner, protocol, reports)


P1_LEARNERS = ["icarl", "der", "l2p", "dualprompt", "lae", "ranpac"]  # --protocol p1 (the family files add theirs)
# --- FeCAM and APER (adapter) under the PILOT profile (issue 21) ------------------------------------------------------


def their_fecam_precisions(official) -> torch.Tensor:
    """What PILOT's ``_mahalanobis`` inverts per class (``models/fecam.py`` line 147): pinv of its stored matrix."""
    return torch.stack([torch.linalg.pinv(cov).float() for cov in official.cov_mats])


def check_adapted_learner(learner: str, broken: str = "", tasks: int = TASKS) -> dict:
    """FeCAM or APER (adapter) under pilot's PILOT profile beside PILOT's ``models/<learner>.py``: both train
    AdaptFormer adapters with a temporary cosine head on the first task (PILOT's drawn adapters and head copied into
    pilot's, dropout off), then FeCAM keeps per class the mean and PILOT's covariance of the adapted features
    (``pilot_covariance``), APER cosine prototypes of the pre-trained and the adapted features concatenated."""
    import utils.inc_net as inc_net
    from pilot.modules import gaussians
    module = __import__(f"models.{learner}", fromlist=["Learner"])
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as patches:
        torch.manual_seed(0)
        run = profile_run(learner, Path(folder), tasks)
        banks = image_banks(run)
        schedule = Schedule()
        args = {**official_args(learner, run), "dataset": "synthetic"}  # FeCAM names its checkpoint with it
        plain = copy.deepcopy(run.ctx.backbone).eval()  # APER's pre-trained branch
        plain.out_dim = run.ctx.backbone.feature_dim
        patches.enter_context(mock.patch.object(inc_net, "get_backbone", lambda wanted, *_: (
            adapter_vit(run, args) if "_adapter" in wanted["backbone_type"] else copy.deepcopy(plain))))
        torch.manual_seed(1)
        official = module.Learner(args)
        official.save_checkpoint = lambda *_: None
        data_manager = same_batches(run, banks, schedule, module)
        adapted = official._network.backbone  # PILOT's adapter ViT: APER's second branch once it has trained
        no_adapter_dropout(official, run)
        copy_adapters(official, run, "")
        initial_adapters = [p.detach().clone() for _, p, _ in adapter_pairs(official, run)]
        drawn, ours = {}, run.learner
        share_first_head(official, ours, drawn)
        if broken == "covariance_ridge":
            patches.enter_context(mock.patch.object(gaussians, "PILOT_FECAM_RIDGE", 10.0))
        if broken == "pretrained_branch":
            ours.combined_features = lambda split: torch.cat([ours.adapted_features(split)] * 2, dim=1)
        reports = []
        for task, seen in both_trained(run, official, schedule, data_manager):
            test_labels, images, our_logits, network = side_by_side(official, ours, seen, banks)
            their_rows = network.fc.weight[: task.num_seen]
            with torch.no_grad():
                if learner == "fecam":  # its _eval_cnn ranks by distance: minus PILOT's own distances
                    their_logits = -torch.from_numpy(official._maha_dist(network.backbone(images).numpy(),
                                                                         network.fc.weight.data, official.cov_mats)).T
                else:
                    their_logits = network(images)["logits"][:, : task.num_seen]
            adapters = adapter_pairs(official, run, adapted)
            head = [("task-1 head.weight", drawn["our_trained_head"], drawn["trained_head"]),
                    ("task-1 head.sigma", drawn["our_sigma"], drawn["sigma"])]
            if learner == "fecam":
                classifier = [("class means", ours.classifier.means, their_rows),
                              ("precisions", ours.classifier.precisions, their_fecam_precisions(official))]
            else:
                classifier = [("prototypes", ours.classifier.prototypes, their_rows)]
            moved = largest([(n, mine, start) for (n, mine, _), start in zip(adapters, initial_adapters)])[1]
            extra = {"adapters_moved_by": moved, "adapters_relative": largest(adapters)[2],
                     "task1_head_relative": largest(head)[2], "classifier_relative": largest(classifier)[2]}
            reports.append(profile_report(task, classifier + adapters + head, their_logits, our_logits, test_labels,
                                          extra))
            official.after_task()
        run.ctx.access.open()
    return {"learner": learner, "tasks": reports, "agree": all(t["agree"] for t in reports)}


# --- LAE under the PILOT profile (issue 21) ----------------------------------------------------------------------------


def lae_vit(run: Run) -> torch.nn.Module:
    """PILOT's ``backbone/vit_lae.py`` VisionTransformer at pilot's ViT's size (what ``vit_tiny_patch16_224_lae``
    builds at ViT-Tiny's), loaded with its weights (P1: DeiT-Tiny's) through its own ``checkpoint_filter_fn``, as
    ``build_model_with_cfg`` loads a pre-trained file."""
    import timm.layers.helpers
    sys.modules.setdefault("timm.models.layers.helpers", timm.layers.helpers)  # timm 1.x moved it (vit_lae imports it)
    from backbone import vit_lae
    timm_vit = run.ctx.backbone.model
    model = vit_lae.VisionTransformer(**vit_size(run))
    loaded = model.load_state_dict(vit_lae.checkpoint_filter_fn(timm_vit.state_dict(), model), strict=False)
    assert not loaded.missing_keys and not loaded.unexpected_keys, loaded  # every ViT weight, nothing else
    return model


def lae_pairs(ours, network, seen: int) -> list:
    """(name, pilot's, PILOT's in pilot's layout): the online and offline PETs ([blocks, key/value, length, D]
    tokens and [blocks, key/value, 1, 1] scales; PILOT a Prefix per block of two Prompts), then (once PILOT has a
    head, ``seen`` > 0) the seen head rows."""
    pairs = []
    for name, pets in (("online", network.pets), ("offline", network.pets_emas)):
        tokens = torch.stack([torch.stack([pet.key.tokens, pet.val.tokens]) for pet in pets])
        scales = torch.stack([torch.stack([pet.key.scaler.scale, pet.val.scaler.scale]) for pet in pets])
        pairs += [(f"{name}.prompts", ours.net[name].tokens.prompts, tokens),
                  (f"{name}.scales", ours.net[name].scales, scales.reshape(-1, 2, 1, 1))]
    return pairs + ([("head.weight", ours.net["head"].weight[:seen], network.fc.weight),
                     ("head.bias", ours.net["head"].bias[:seen], network.fc.bias)] if seen else [])


def their_lae_probabilities(official, images: torch.Tensor, seen: int) -> torch.Tensor:
    """What PILOT's ``_eval_cnn`` ranks (``models/lae.py`` lines 180-198): per class the larger of the online and
    the offline PET's softmax over the seen classes."""
    network = official._network.eval()
    with torch.no_grad():
        online = network(images)["logits"][:, :seen].softmax(dim=1)
        network.attach_pets_vit(network.pets_emas)
        offline = network(images)["logits"][:, :seen].softmax(dim=1)
        network.attach_pets_vit(network.pets)
    return torch.stack([online, offline], dim=-1).max(dim=-1)[0]


def check_lae_learner(learner: str, broken: str = "", tasks: int = TASKS, protocol: str = "tiny",
                      settings: dict | None = None) -> dict:
    """LAE under pilot's PILOT profile beside PILOT's ``models/lae.py`` (PILOT with its own exps/lae.json; on P1 as
    ``tools/lamda_pilot.py`` runs it): PILOT's drawn PET (online = offline at the start) and each task's drawn head
    rows copied into pilot's, the same batches; after every task both PETs, the head and the ensemble's
    probabilities are compared."""
    import utils.inc_net as inc_net
    module = __import__(f"models.{learner}", fromlist=["Learner"])
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as patches:
        run, banks, args = profile_setup(learner, Path(folder), tasks, protocol, settings)
        schedule = Schedule()
        patches.enter_context(mock.patch.object(inc_net, "get_backbone", lambda *_, **__: lae_vit(run)))
        torch.manual_seed(1)
        official = module.Learner(args)
        network = official._network
        network.backbone.out_dim = run.ctx.backbone.feature_dim  # utils/inc_net.py LAE.__init__ sets 768 (ViT-B)
        data_manager = same_batches(run, banks, schedule, module)
        ours, drawn = run.learner, {}
        with torch.no_grad():  # PILOT's drawn PETs into pilot's
            for _, mine, theirs in lae_pairs(ours, network, 0):
                mine.copy_(theirs)
        update_fc = network.update_fc

        def recording_update_fc(total):
            update_fc(total)
            drawn.update(weight=network.fc.weight.detach().clone(), bias=network.fc.bias.detach().clone())

        network.update_fc = recording_update_fc
        if broken == "lae_offline_start":
            ours.config.offline_from_start = False
        if broken == "lae_first_freeze":
            ours.config.freeze_first_task = False
        initial = [p.detach().clone() for _, p, _ in lae_pairs(ours, network, 0)]
        reports = []

        def drawn_rows(task):  # this task's drawn head rows into pilot's
            with torch.no_grad():
                ours.net["head"].weight[task.num_old: task.num_seen] = drawn["weight"][task.num_old:]
                ours.net["head"].bias[task.num_old: task.num_seen] = drawn["bias"][task.num_old:]

        for task, seen in both_trained(run, official, schedule, data_manager, drawn_rows):
            test_labels = np.concatenate([t.test.labels for t in seen])
            test_ids = np.concatenate([t.test.indices for t in seen])
            our_probabilities = torch.cat([ours.predict(t.test) for t in seen]).exp()  # pilot: log-probabilities
            their_probabilities = their_lae_probabilities(official, banks["test"][torch.from_numpy(test_ids)],
                                                          task.num_seen)
            official.topk = 1  # its _eval_cnn's top-5 needs 5 classes seen
            their_predictions, _ = official._eval_cnn(Batches(test_ids, test_labels, banks["test"],
                                                              args["batch_size"], task.index, False))
            parameters = lae_pairs(ours, network, task.num_seen)
            moves = [(n, mine, start) for (n, mine, _), start in zip(parameters, initial)]  # the PETs' four tensors
            online, offline = moves[:2], moves[2:]
            extra = {"online_pet_moved_by": largest(online)[1], "offline_pet_moved_by": largest(offline)[1],
                     "online_pet_relative": largest(parameters[:2])[2],
                     "offline_pet_relative": largest(parameters[2:4])[2], "head_relative": largest(parameters[4:])[2],
                     "eval_cnn_predictions_identical":  # PILOT's own _eval_cnn against pilot's
                         their_predictions[:, 0].tolist() == our_probabilities.argmax(1).tolist()}
            report = profile_report(task, parameters, their_probabilities, our_probabilities, test_labels, extra,
                                    ADAM_TOLERANCE)
            reports.append({**report, "agree": report["agree"] and extra["eval_cnn_predictions_identical"]})
            announce(protocol, learner, reports[-1])
            official.after_task()
        run.ctx.access.open()
    return profile_result(learner, protocol, reports)


CHECKS = {"icarl": check_exemplar_learner, "der": check_exemplar_learner, "simplecil": check_profile_learner,
          "ranpac": check_profile_learner, "l2p": check_prompt_learner, "dualprompt": check_prompt_learner,
          "fecam": check_adapted_learner, "aper_adapter": check_adapted_learner, "lae": check_lae_learner}
# Learners checked in files of their own (each imports this module and registers its checks, --break ablations,
# official fixes, patches and P1 learners in the tables above)
FAMILIES = ("lamda_replay_aper_vpt", "lamda_replay_finetune", "lamda_replay_mos", "lamda_replay_slca")


def with_families() -> None:
    """Import the family files, which fill CHECKS, BREAKS, FIXES, PATCHES and P1_LEARNERS with their learners'."""
    for name in FAMILIES:
        importlib.import_module(name)


def fix_for(learner: str, official_fix: str) -> dict:
    """``official_fix`` as the keyword argument of ``learner``'s check (ValueError for another learner's fix)."""
    if not official_fix:
        return {}
    if FIXES[official_fix][0] != learner:
        raise ValueError(f"--official-fix {official_fix} applies to {FIXES[official_fix][0]} only")
    return {"official_fix": official_fix}


def check(learner: str, broken: str = "", tasks: int = TASKS, official_fix: str = "") -> dict:
    """Run both codes (PILOT's importable) on the first ``tasks`` tasks; one report per task. ``official_fix``
    (``FIXES``) changes PILOT's code to show that a difference found is the whole gap."""
    with_families()
    report = CHECKS[learner](learner, broken, tasks, **fix_for(learner, official_fix))
    return {**report, "official_fix": official_fix or None}


def check_p1(learner: str, official_fix: str = "", settings: dict | None = None) -> dict:
    """One learner of ``P1_LEARNERS`` on P1 itself, the random stream shared (``official_fix``: ``FIXES``;
    ``settings``: keys laid over both sides' configs, a cut-down trial that is not P1)."""
    with_families()
    report = CHECKS[learner](learner, protocol="p1", settings=settings, **fix_for(learner, official_fix))
    return {**report, "official_fix": official_fix or None, "settings": settings or None}


def parse_settings(items: list[str]) -> dict:
    """``--set KEY=JSON`` items as a dict (ValueError naming the item that is not KEY=JSON)."""
    settings = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"--set {item}: expected KEY=JSON, e.g. tuned_epoch=1 or train_per_class=4") from None
    return settings


def main() -> int:
    with_families()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pilot-repo", type=Path, default=Path(os.environ.get("LAMDA_PILOT_MIRROR", MIRROR)),
                        help="LAMDA-PILOT's bare git mirror (default $LAMDA_PILOT_MIRROR or %(default)s)")
    parser.add_argument("--learner", choices=(*CHECKS, "all"), default="all")
    parser.add_argument("--break", dest="broken", choices=sorted(BREAKS), default="",
                        help="an ablation that must make the check fail: " + "; ".join(f"{k}: {v}" for k, v in BREAKS.items()))
    parser.add_argument("--official-fix", choices=sorted(FIXES), default="",
                        help="diagnosis: change PILOT's code where a difference was found, before comparing; with it "
                             "the check must agree: " + "; ".join(f"{k} ({learner}): {why}"
                                                                  for k, (learner, why) in FIXES.items()))
    parser.add_argument("--tasks", type=int, default=TASKS, choices=range(1, TASKS + 1),
                        help="how many of the tasks to run (default %(default)s)")
    parser.add_argument("--protocol", choices=["tiny", "p1"], default="tiny",
                        help="tiny: a tiny random ViT and synthetic images (seconds); p1: protocol P1 itself, "
                             f"{', '.join(P1_LEARNERS)} only (DeiT-Tiny, CIFAR-100's subset, PILOT's transforms and "
                             "augmentation; pilot's P1 config under the PILOT profile as tools/reproduce.py runs it, PILOT's "
                             "as tools/lamda_pilot.py does; 20-40 minutes a learner on one CPU thread; --assets or "
                             "PILOT_DATA_DIR and PILOT_WEIGHTS_DIR)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=JSON",
                        help="--protocol p1 only: a key laid over both sides' configs, for a short trial (e.g. "
                             "train_per_class=4, tuned_epoch=1); the result is then not P1")
    parser.add_argument("--assets", type=Path, help="the folder holding the DeiT-Tiny weights and CIFAR-100 (--protocol p1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch's CPU threads (default 1: both codes run in this process alike, and one thread is "
                             "fastest on a busy CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.pilot_repo / "HEAD").is_file():
        print(f"No LAMDA-PILOT mirror at '{args.pilot_repo}': fetch github.com/sun-hailong/LAMDA-PILOT as a bare "
              f"mirror and pass --pilot-repo <path> (or set LAMDA_PILOT_MIRROR).", file=sys.stderr)
        return 2
    learners = list(CHECKS) if args.learner == "all" else [args.learner]
    if args.protocol == "p1":
        learners = P1_LEARNERS if args.learner == "all" else learners
        if not set(learners) <= set(P1_LEARNERS) or args.broken:
            parser.error(f"--protocol p1 runs {', '.join(P1_LEARNERS)} as they are (no --break)")
        for variable in ("PILOT_DATA_DIR", "PILOT_WEIGHTS_DIR"):
            os.environ[variable] = str(args.assets or os.environ.get(variable, ""))
    elif args.settings:
        parser.error("--set is for --protocol p1 trials (the tiny checks fix their own small settings)")
    if args.official_fix and learners != [FIXES[args.official_fix][0]]:
        parser.error(f"--official-fix {args.official_fix} needs --learner {FIXES[args.official_fix][0]}")
    try:
        settings = parse_settings(args.settings)
    except ValueError as error:
        parser.error(str(error))
    if args.tasks != TASKS:
        settings["max_tasks"] = args.tasks
    with tempfile.TemporaryDirectory() as folder:
        importable(args.pilot_repo, Path(folder))
        with contextlib.redirect_stdout(sys.stderr):  # PILOT prints as it goes
            reports = [check_p1(learner, args.official_fix, settings) if args.protocol == "p1"
                       else check(learner, args.broken, args.tasks, args.official_fix) for learner in learners]
    report = {"pilot_commit": COMMIT, "tolerance": {"parameters_relative": PARAMETER_TOLERANCE,
                                                      "adam_trained_relative": ADAM_TOLERANCE,
                                                      "memory_and_predictions": "identical"},
              "break": args.broken or None, "patches": PATCHES, "learners": reports,
              "agree": all(r["agree"] for r in reports)}
    print(json.dumps(report, indent=1))
    return 0 if report["agree"] else 1


if __name__ == "__main__":
    from lamda_official_replay import main as main_of_the_importable_copy  # the copy the family files register in
    sys.exit(main_of_the_importable_copy())
