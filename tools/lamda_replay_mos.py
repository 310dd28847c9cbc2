"""MOS under pilot's PILOT profile beside LAMDA-PILOT's own ``models/mos.py`` (issue 21): a family of
``tools/lamda_official_replay.py`` (registered in its tables at import).

PILOT's MOS ViT (``backbone/vit_mos.py``) is built at the tiny ViT's size and loaded with its weights; PILOT's drawn
adapters and linear head are copied into pilot's (adapter dropout 0 on both sides), both read the same batches,
and the classifier alignment's Gaussian samples and shuffle that PILOT draws are given to pilot's alignment. After
every task the current adapter, the stored (per-task) adapters, the head, the class statistics, the retrieval
prototypes and the ensemble's test outputs (what PILOT's own ``_eval_cnn`` ranks) are compared.

    python tools/lamda_official_replay.py --learner mos                 # PILOT as it is
    python tools/lamda_official_replay.py --learner mos --official-fix eval_pulls  # PILOT's in-place pulls outside training removed
    python tools/lamda_official_replay.py --learner mos --break forward_merge      # must print "agree": false
    python tools/lamda_official_replay.py --protocol p1 --learner mos --official-fix eval_pulls --assets ../shared/assets
"""
from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lamda_official_replay import (BREAKS, CHECKS, FIXES, P1_LEARNERS, PATCHES, PROFILE_SETTINGS, TASKS,  # noqa: E402
                                   Schedule, adapter_set_pairs, announce, both_trained, largest, profile_report,
                                   profile_result, profile_setup, same_batches, split_qkv, unaugmented_test_mode,
                                   vit_size)

# two epochs a task (the first task's cosine schedule and the pulls of later tasks both act), init_lr 0.3 so the
# adapters (up-projection drawn at 0) move visibly; two alignment epochs; batch 4 (20 Gaussian samples a class)
MOS_SETTINGS = {"tuned_epoch": 2, "init_lr": 0.3, "batch_size": 4, "ffn_num": 8, "crct_epochs": 2}
# the class covariances: PILOT's torch.cov of float32 features in float32, pilot's in float64 (then float32)
STATISTICS_TOLERANCE = 1e-4
MOS_BREAKS = {"forward_merge": "pilot's MOS merges once after each step (adapter_merge \"step\"; PILOT also pulls "
                               "the adapter before every block of every training forward)",
              "orthogonality": "pilot's MOS trains without its orthogonality loss (reg 0; PILOT's 0.1)"}
MOS_FIXES = {"eval_pulls": "PILOT's vit_mos forward_features in eval mode (the statistics pass, test) reads the "
                           "adapters as they are instead of pulling them in place (a diagnosis)"}
MOS_PATCHES = [
    "mos: utils.inc_net.get_backbone -> backbone/vit_mos.py's VisionTransformer at the tiny ViT's size, loaded as "
    "vit_base_patch16_224_mos loads ViT-B/16 (qkv split into q/k/v, mlp.fc* renamed, all but the adapters and the "
    "head frozen), its head drawn as timm draws a new ViT head (trunc normal 0.02, bias 0); tuning_config in a "
    "SimpleNamespace (easydict is not installed); MOSNet's backbone.out_dim 768 (hard-coded) -> the tiny width; "
    "the adapters' dropout 0.1 -> 0 on both sides; PILOT's drawn adapters and head copied into pilot's",
    "mos: MultivariateNormal in models.mos and torch.randperm wrapped while PILOT trains, to record the classifier "
    "alignment's samples and shuffle; pilot's ClassGaussians.sample returns them, epoch by epoch",
    "mos: torch.topk wrapped while PILOT's _eval_cnn runs (topk 5 -> 1), to record the outputs it ranks",
    "mos, --official-fix eval_pulls only: vit_mos VisionTransformer.reweight_adapter pulls nothing while the ViT is "
    "in eval mode",
    "mos --protocol p1: the data manager's mode='test' datasets of the training source use the un-augmented bank "
    "(as for aper_vpt)"]


def mos_vit(run, args: dict) -> torch.nn.Module:
    """PILOT's ``backbone/vit_mos.py`` VisionTransformer at the tiny ViT's size (DeiT-Tiny's on P1), with the tuning config of
    ``utils/inc_net.py``'s ``get_backbone`` (its width the tiny ViT's, as ``tools/lamda_pilot.py`` sets ViT-Ti's),
    loaded with the tiny ViT's weights as ``vit_base_patch16_224_mos`` loads ViT-B/16; the head (num_classes =
    nb_classes) drawn as ``timm.create_model(..., num_classes=nb_classes)`` draws the one PILOT loads."""
    from functools import partial
    from types import SimpleNamespace

    from backbone import vit_mos
    timm_vit, size = run.ctx.backbone.model, vit_size(run)
    dim = size["embed_dim"]
    tuning = SimpleNamespace(ffn_adapt=True, ffn_option="parallel", ffn_adapter_layernorm_option="none",
                             ffn_adapter_init_option="lora", ffn_adapter_scalar="0.1", ffn_num=args["ffn_num"],
                             d_model=dim, _device=args["device"][0], adapter_momentum=args["adapter_momentum"],
                             vpt_on=False, vpt_num=0)
    model = vit_mos.VisionTransformer(
        **size, mlp_ratio=4, qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_classes=args["nb_classes"], global_pool=False,
        drop_path_rate=0.0, tuning_config=tuning)
    state = split_qkv({k: v for k, v in timm_vit.state_dict().items() if not k.startswith("head.")}, dim)
    missing = model.load_state_dict(state, strict=False).missing_keys
    assert all("adapter" in key or key.startswith("head.") for key in missing), missing  # every ViT weight loaded
    with torch.no_grad():
        torch.nn.init.trunc_normal_(model.head.weight, std=0.02)
        torch.nn.init.zeros_(model.head.bias)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = "head" in name or "adapter" in name
    return model


class AlignmentDraws:
    """PILOT's classifier-alignment draws, recorded while it trains (its ``MultivariateNormal`` samples, class by
    class, and each epoch's ``torch.randperm``), given back to pilot's ``ClassGaussians.sample`` epoch by epoch:
    the same features in the same order."""

    def __init__(self):
        self.samples, self.orders = [], []

    def recording(self):
        import models.mos
        draws, normal, randperm = self, models.mos.MultivariateNormal, torch.randperm

        class RecordingNormal(normal):
            def sample(self, sample_shape=torch.Size()):
                drawn = super().sample(sample_shape)
                draws.samples.append(drawn.detach().clone())
                return drawn

        def recording_randperm(*args, **kwargs):
            order = randperm(*args, **kwargs)
            draws.orders.append(order.clone())
            return order

        stack = contextlib.ExitStack()
        stack.enter_context(mock.patch.object(models.mos, "MultivariateNormal", RecordingNormal))
        stack.enter_context(mock.patch.object(torch, "randperm", recording_randperm))
        return stack

    def replay(self, cholesky_factors, per_class, mean_scales, generator):
        """pilot's ``ClassGaussians.sample`` signature: the next epoch of PILOT's draws (one Gaussian per class)."""
        classes = len(cholesky_factors)
        samples = torch.cat([self.samples.pop(0) for _ in range(classes)])
        labels = torch.arange(classes).repeat_interleave(per_class)
        order = self.orders.pop(0)
        return samples[order], labels[order]


def eval_pulls_fixed(reweight):
    """``--official-fix eval_pulls`` (a diagnosis, not PILOT's behaviour): ``reweight_adapter`` pulls the adapter
    it is given in place (``.data =``) on every call, and ``forward_features`` calls it before every block of
    every forward, also in eval mode: PILOT's statistics pass (``_compute_mean``, train=True in eval mode) pulls
    the current adapter ``depth`` times per batch (its class means then come from a moving adapter, and the next
    task starts from it), and every test forward pulls the stored adapter of each task t >= 1 towards the mean
    of the earlier ones. Here nothing is pulled while the ViT is in eval mode."""
    def fixed(self, adapter, idx):
        return adapter if not self.training else reweight(self, adapter, idx)
    return fixed


def their_outputs(official, test_ids: np.ndarray, test_labels: np.ndarray, banks) -> tuple[torch.Tensor, np.ndarray]:
    """PILOT's own ``eval_task`` as its trainer calls it after every task (its test loader: the seen classes,
    class-sorted, batches of ``batch_size``), with the outputs its ``_eval_cnn`` ranks recorded; those outputs in
    pilot's test order, and PILOT's predictions in PILOT's order with its test ids."""
    topk, outputs = torch.topk, []

    def recording_topk(values, *args, **kwargs):
        outputs.append(values.detach().clone())
        return topk(values, *args, **kwargs)

    official.topk = 1  # its top-5 needs 5 classes seen
    with mock.patch.object(torch, "topk", recording_topk):
        predictions, _ = official._eval_cnn(official.test_loader)
    their_ids = official.test_loader.ids
    position = {int(i): row for row, i in enumerate(their_ids)}
    order = torch.tensor([position[int(i)] for i in test_ids])
    return torch.cat(outputs)[order], predictions[:, 0][order.numpy()]


def check_mos_learner(learner: str = "mos", broken: str = "", tasks: int = TASKS, official_fix: str = "",
                      protocol: str = "tiny", settings: dict | None = None) -> dict:
    """MOS under pilot's PILOT profile beside PILOT's ``models/mos.py`` (PILOT with its own exps/mos.json):
    PILOT's drawn adapters and head copied into pilot's, the same batches and alignment samples; after every task
    the current and the stored adapters, the head, the class means and covariances, the retrieval prototypes
    and the ensemble's outputs are compared (the stored adapters before PILOT's evaluation pulls them).
    ``protocol`` "p1": P1 itself (DeiT-Tiny, CIFAR-100's subset, PILOT's transforms and augmentation shared, its
    config as ``tools/lamda_pilot.py`` runs it, the adapters' dropout 0 on both sides; ``settings`` laid over both
    sides, a cut-down trial)."""
    import models.mos
    import utils.inc_net as inc_net
    from backbone import vit_mos
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as patches:
        run, banks, args = profile_setup(learner, Path(folder), tasks, protocol, settings)
        schedule = Schedule()
        patches.enter_context(mock.patch.object(inc_net, "get_backbone", lambda *_, **__: mos_vit(run, args)))
        if official_fix == "eval_pulls":
            patches.enter_context(mock.patch.object(vit_mos.VisionTransformer, "reweight_adapter",
                                                    eval_pulls_fixed(vit_mos.VisionTransformer.reweight_adapter)))
        torch.manual_seed(1)
        official = models.mos.Learner(args)
        network = official._network
        network.backbone.out_dim = run.ctx.backbone.feature_dim  # MOSNet.__init__ sets 768 (ViT-B)
        data_manager = same_batches(run, banks, schedule, models.mos)
        unaugmented_test_mode(data_manager, banks)
        ours, theirs = run.learner, network.backbone
        for adapter in theirs.cur_adapter:
            adapter.dropout = 0.0
        for unit in ours.net["current"].units:
            unit.dropout.p = 0.0
        rows = ours.net["head"].out_features  # PILOT's head: the dataset's classes (100 on P1), the rest never read
        with torch.no_grad():  # PILOT's drawn adapters and head into pilot's
            for _, mine, drawn in adapter_set_pairs("current", ours.net["current"], theirs.cur_adapter):
                mine.copy_(drawn)
            ours.net["head"].weight.copy_(theirs.head.weight[:rows])
            ours.net["head"].bias.copy_(theirs.head.bias[:rows])
        if broken == "forward_merge":
            ours.config.adapter_merge = "step"
        if broken == "orthogonality":
            ours.config.reg = 0.0
        draws = AlignmentDraws()
        patches.enter_context(mock.patch.object(ours.statistics, "sample", draws.replay))
        train = official.incremental_train

        def recording_train(manager):
            with draws.recording():
                train(manager)

        official.incremental_train = recording_train
        initial = [p.detach().clone() for _, p, _ in adapter_set_pairs("current", ours.net["current"],
                                                                        theirs.cur_adapter)]
        stored = []  # PILOT's stored adapters as training left them (its evaluation pulls them in place)

        def snapshot(task):
            stored[:] = [[p.detach().clone() for _, _, p in adapter_set_pairs("", ours.net["current"], adapters)]
                         for adapters in theirs.adapter_list]

        reports = []
        for task, seen in both_trained(run, official, schedule, data_manager, snapshot):
            test_ids = np.concatenate([t.test.indices for t in seen])
            test_labels = np.concatenate([t.test.labels for t in seen])
            our_outputs = torch.cat([ours.predict(t.test) for t in seen])
            their, their_predictions = their_outputs(official, test_ids, test_labels, banks)
            parameters = adapter_set_pairs("current", ours.net["current"], theirs.cur_adapter)
            for t, (adapters, snapshot_t) in enumerate(zip(ours.net["adapters"], stored)):
                parameters += [(f"stored{t}.{n}", mine, before)
                               for (n, mine, _), before in zip(adapter_set_pairs("", adapters, theirs.adapter_list[t]),
                                                               snapshot_t)]
            parameters += [("head.weight", ours.net["head"].weight, theirs.head.weight[:rows]),
                           ("head.bias", ours.net["head"].bias, theirs.head.bias[:rows])]
            statistics = [("class means", ours.statistics.means, torch.stack(list(official.cls_mean.values()))),
                          ("class covariances", ours.statistics.covs, torch.stack(list(official.cls_cov.values()))),
                          ("prototypes", ours.prototypes.prototypes, network.fc.weight[: task.num_seen])]
            drift = largest([(f"stored{t}", torch.cat([p.flatten() for _, _, p in adapter_set_pairs(
                "", ours.net["current"], theirs.adapter_list[t])]), torch.cat([p.flatten() for p in snapshot_t]))
                for t, snapshot_t in enumerate(stored)])
            moved = largest([(n, mine, start) for (n, mine, _), start in zip(parameters, initial)])[1]
            extra = {"adapters_moved_by": moved,
                     "current_adapter_relative": largest(parameters[: len(initial)])[2],
                     "stored_adapters_relative": largest(parameters[len(initial): -2])[2],
                     "head_relative": largest(parameters[-2:])[2],
                     "statistics_relative": largest(statistics)[2],
                     "their_eval_pulled_stored_adapters_by": drift[1],
                     "eval_cnn_predictions_identical":
                         their_predictions.tolist() == our_outputs.argmax(1).tolist()}
            report = profile_report(task, parameters, their, our_outputs, test_labels, extra)
            reports.append({**report, "agree": report["agree"] and extra["eval_cnn_predictions_identical"]
                            and extra["statistics_relative"] <= STATISTICS_TOLERANCE})
            announce(protocol, learner, reports[-1])
            official.after_task()
        run.ctx.access.open()
    return {**profile_result(learner, protocol, reports), "official_fix": official_fix or None}


CHECKS["mos"] = check_mos_learner
BREAKS.update(MOS_BREAKS)
FIXES.update({fix: ("mos", why) for fix, why in MOS_FIXES.items()})
PATCHES.extend(MOS_PATCHES)
P1_LEARNERS.append("mos")
PROFILE_SETTINGS["mos"] = MOS_SETTINGS
