"""PROOF beside its official code: the same random weights, tiny inputs and seed through both; the
parameters after training and the evaluation logits must agree to 1e-5.

The official code (zhoudw-zdw/PROOF) is read from a copy outside this repository and imported in this
process only; nothing of it enters pilot. Its ``Proof_Net`` is built around a tiny random open_clip model
(its ``get_convnet`` would download ViT-B/16), its ``Learner._train_proj`` trains on the given batches (one
list of batches per task), and its ``Learner._eval_cnn`` evaluates, its logits read where it ranks them. Ours:
``pilot.learners.proof.ProofNet`` with the optimiser and schedule ``Proof`` builds, on the same CLIP's
frozen features. Before each task the official network receives our freshly drawn layers and prompts;
both then train with the global generator seeded alike (the fusion module's dropout draws the same masks).

    python tools/clip_official_check.py --proof-repo /path/to/PROOF        # a checkout or a bare git mirror

Exit status 0 when everything agrees within the tolerance; prints each maximal difference.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pilot.learners._gradient import descend, make_optimizer, make_scheduler  # noqa: E402
from pilot.learners.proof import ProofConfig, ProofNet  # noqa: E402

DEFAULT_MIRROR = Path("/work/.mirror/zhoudw-zdw+PROOF/repo")
TOLERANCE = 1e-5
TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
CLASS_NAMES = ["apple", "bicycle", "cloud", "dolphin", "forest", "girl"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of a {}.", "art of the {}."]
TASKS = [range(0, 2), range(2, 4), range(4, 6)]
IMAGES_PER_CLASS, BATCH, EPOCHS = 4, 5, 2


def official_source(repo: Path, into: Path) -> Path:
    """A directory holding the official code: ``repo`` itself if it is a checkout, else its HEAD exported."""
    if (repo / "models" / "proof.py").is_file():
        return repo
    archive = subprocess.run(["git", "-C", str(repo), "archive", "HEAD"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def tiny_clip(folder: Path):
    import open_clip

    (folder / "pilot-check-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder / "pilot-check-clip.json")
    torch.manual_seed(0)
    model = open_clip.create_model("pilot-check-clip").eval()
    return model, open_clip.get_tokenizer("pilot-check-clip")


def official_learner(model, tokenizer, config: ProofConfig):
    """The official ``models/proof.py`` Learner around ``model`` (its convnet), on the CPU."""
    import models.proof as official
    import utils.inc_net as inc_net

    model.out_dim = TINY_CLIP["embed_dim"]
    args = {"convnet_type": "clip", "model_name": "proof", "device": ["cpu"], "projection_type": "pure_mlp",
            "memory_size": 0, "memory_per_class": 0, "fixed_memory": False, "batch_size": BATCH,
            "init_lr": config.init_lr, "weight_decay": config.weight_decay, "min_lr": config.min_lr,
            "tuned_epoch": EPOCHS, "optimizer": config.optimizer}
    with mock.patch.object(inc_net, "get_convnet", lambda *_: (model, None, tokenizer)):
        learner = official.Learner(args)
    learner.data_manager = type("Names", (), {"_class_to_label": CLASS_NAMES, "_data_to_prompt": TEMPLATES})()
    return learner


def copy_new_task(ours: ProofNet, theirs, task: int) -> None:
    """The official network receives our layers and prompts of ``task`` (and every prototype)."""
    with torch.no_grad():
        for mine, official in ((ours.image_projections[task], theirs.projs_img[task].MLP[0]),
                               (ours.text_projections[task], theirs.projs_text[task].MLP[0])):
            official.weight.copy_(mine.weight)
            official.bias.copy_(mine.bias)
        theirs.context_prompts[task].copy_(ours.context_prompts[task])
        theirs.img_prototypes = ours.prototypes.clone()


def copy_shared(ours: ProofNet, theirs) -> None:
    attention = theirs.sel_attn
    with torch.no_grad():
        for mine, official in ((ours.fusion.query, attention.w_qs), (ours.fusion.key, attention.w_ks),
                               (ours.fusion.value, attention.w_vs), (ours.fusion.out, attention.fc),
                               (ours.fusion.norm, attention.layer_norm)):
            for name, tensor in mine.named_parameters():
                getattr(official, name).copy_(tensor)
        theirs.convnet.logit_scale.copy_(ours.logit_scale)


def differences(ours: ProofNet, theirs) -> dict[str, float]:
    """Largest absolute difference of each trained part."""
    pairs = {"logit_scale": (ours.logit_scale, theirs.convnet.logit_scale),
             **{f"image_projection_{i}": (mine.weight, official.MLP[0].weight)
                for i, (mine, official) in enumerate(zip(ours.image_projections, theirs.projs_img))},
             **{f"text_projection_{i}": (mine.weight, official.MLP[0].weight)
                for i, (mine, official) in enumerate(zip(ours.text_projections, theirs.projs_text))},
             **{f"context_prompts_{i}": (mine, official)
                for i, (mine, official) in enumerate(zip(ours.context_prompts, theirs.context_prompts))},
             "fusion_query": (ours.fusion.query.weight, theirs.sel_attn.w_qs.weight),
             "fusion_out": (ours.fusion.out.weight, theirs.sel_attn.fc.weight)}
    return {name: float((a.detach() - b.detach()).abs().max()) for name, (a, b) in pairs.items()}


def official_logits(learner, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``_eval_cnn``'s summed logits, read where it ranks them (torch.topk)."""
    seen = []
    topk = torch.topk

    def recording(outputs, *args, **kwargs):
        seen.append(outputs.detach().clone())
        return topk(outputs, *args, **kwargs)

    learner.topk = 1
    with mock.patch.object(torch, "topk", recording):
        learner._eval_cnn([(None, batch, target) for batch, target in zip(images.split(BATCH), labels.split(BATCH))])
    return torch.cat(seen)


def check(repo: Path, tasks: int = len(TASKS)) -> dict:
    config = ProofConfig(batch_size=BATCH, tuned_epoch=EPOCHS)
    with tempfile.TemporaryDirectory() as folder:
        source = official_source(repo, Path(folder))
        sys.path.insert(0, str(source))
        model, tokenizer = tiny_clip(Path(folder))
        learner = official_learner(model, tokenizer, config)
        theirs = learner._network
        generator = torch.Generator().manual_seed(1)
        images = torch.randn(len(CLASS_NAMES) * IMAGES_PER_CLASS, 3, 32, 32, generator=generator)
        labels = torch.arange(len(CLASS_NAMES)).repeat_interleave(IMAGES_PER_CLASS)
        with torch.no_grad():
            features = model.encode_image(images)
            text = model.encode_text(tokenizer([t.format(n) for n in CLASS_NAMES for t in TEMPLATES]))
        text = text.view(len(CLASS_NAMES), len(TEMPLATES), -1)
        torch.manual_seed(2)
        ours = ProofNet(TINY_CLIP["embed_dim"], float(model.logit_scale), config.context_prompt_length_per_task)
        copy_shared(ours, theirs)
        report = {"tolerance": TOLERANCE, "tasks": []}
        for index, classes in enumerate(TASKS[:tasks]):
            ours.add_task(classes.stop)
            with torch.no_grad():
                normalised = torch.nn.functional.normalize(features, dim=-1)
                for c in classes:
                    ours.prototypes[c] = normalised[labels == c].mean(0)
            theirs.update_prototype(classes.stop)
            theirs.update_context_prompt()
            theirs.extend_task()
            copy_new_task(ours, theirs, index)
            learner._cur_task, learner._known_classes, learner._total_classes = index, classes.start, classes.stop
            rows = torch.nonzero((labels >= classes.start) & (labels < classes.stop)).squeeze(1)
            order = rows[torch.randperm(len(rows), generator=generator)]
            batches = list(order.split(BATCH))
            # ours: Proof.fit's step on the cached frozen features
            torch.manual_seed(100 + index)
            optimizer = make_optimizer(ours.trainable(config.freeze_old_text_projections), config)
            scheduler = make_scheduler(optimizer, config)
            ours.train()
            losses = []
            for _ in range(EPOCHS):
                for batch in batches:
                    losses.append(descend(optimizer, ours.training_loss(features[batch], labels[batch],
                                                                      text[:classes.stop, 0])))
                scheduler.step()
            ours.eval()
            # theirs: its training loop on the same batches of images, the same seed for its dropout
            torch.manual_seed(100 + index)
            seen_test = torch.nonzero(labels < classes.stop).squeeze(1)
            learner._train_proj([(None, images[b], labels[b]) for b in batches],
                                [(None, images[seen_test], labels[seen_test])], None)
            learner._known_classes = classes.stop
            with torch.no_grad():
                mine = torch.cat([sum(ours.logit_terms(f, text[:classes.stop]))
                                  for f in features[seen_test].split(BATCH)])
            official = official_logits(learner, images[seen_test], labels[seen_test])
            parts = differences(ours, theirs)
            report["tasks"].append({"task": index + 1, "classes": classes.stop, "last_loss": losses[-1],
                                    "max_parameter_difference": max(parts.values()),
                                    "max_logit_difference": float((mine - official).abs().max()),
                                    "logit_scale": float(ours.logit_scale), "parts": parts})
        sys.path.remove(str(source))
    report["agree"] = all(t["max_parameter_difference"] <= TOLERANCE and t["max_logit_difference"] <= TOLERANCE
                          for t in report["tasks"])
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proof-repo", type=Path, default=DEFAULT_MIRROR,
                        help="the official PROOF code: a checkout, or a bare git mirror (default %(default)s)")
    parser.add_argument("--tasks", type=int, default=len(TASKS), choices=range(1, len(TASKS) + 1),
                        help="how many of the three tasks to run (default all)")
    args = parser.parse_args()
    if not args.proof_repo.exists():
        print(f"No official PROOF code at '{args.proof_repo}': clone github.com/zhoudw-zdw/PROOF and pass "
              f"--proof-repo <path>.", file=sys.stderr)
        return 2
    with contextlib.redirect_stdout(sys.stderr):  # the official code prints as it goes
        report = check(args.proof_repo, args.tasks)
    print(json.dumps(report, indent=1))
    return 0 if report["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
