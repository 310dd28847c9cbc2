"""ZSCL beside its official code: the same random CLIP weights, tiny inputs and batches through both; the loss
of every step, the weights after each task (weight ensemble included) and the evaluation logits must agree
to 1e-5 (losses relative to their size, about 54 here, where one float32 step is 4e-6).

The official code (Thunderbeee/ZSCL, ``cil/``) is read from a copy outside this repository and imported in
this process only; nothing of it enters pilot. Its ``ClassIncremental.train`` runs as it is, on the CPU (its
``.cuda()`` calls made no-ops), with its own CLIP (``cil/clip/model.py``) built tiny and random; where it
would load ViT-B/16, Conceptual Captions and a DataLoader, it gets that tiny model's initial copy, the given
reference batches and sentences, and the given task batches (the missing ``omegaconf`` and ``continuum`` are
stubbed: they only type or load data). Its losses are read where it calls ``backward``. Ours:
``pilot.learners.zscl.train_task`` on an open_clip model holding the same weights (``quick_gelu``, as
OpenAI's CLIP), the same batches in the same order.

    python tools/clip_official_zscl.py --zscl-repo /path/to/ZSCL        # a checkout or a bare git mirror

Exit status 0 when everything agrees within the tolerance; prints each maximal difference.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from unittest import mock

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pilot.clip import class_embeddings, zero_shot_logits  # noqa: E402
from pilot.clip import endless  # noqa: E402
from pilot.learners.zscl import ZSCLConfig, encode_prompts, train_task  # noqa: E402

DEFAULT_MIRROR = Path("/work/.mirror/Thunderbeee+ZSCL/repo")
TOLERANCE = 1e-5
# OpenAI's CLIP layout, tiny: the official CLIP class takes these; open_clip the same as a model config.
EMBED, IMAGE, PATCH, VISION_WIDTH, TEXT_WIDTH, CONTEXT = 16, 32, 16, 64, 32, 77
TINY_CLIP = {"embed_dim": EMBED, "quick_gelu": True,
             "vision_cfg": {"image_size": IMAGE, "layers": 1, "width": VISION_WIDTH, "patch_size": PATCH},
             "text_cfg": {"context_length": CONTEXT, "vocab_size": 49408, "width": TEXT_WIDTH, "heads": 2, "layers": 1}}
CLASS_NAMES = ["apple", "bicycle", "cloud", "dolphin"]
TEMPLATE = "a good photo of a {}."  # imagenet100_10-10-ZSCL.yaml prompt_template
REF_SENTENCES = ["a dog runs on the beach.", "two people ride bicycles in the city.", "a bowl of soup.",
                 "the night sky over a mountain lake.", "a red car parked on the street."]
INCREMENT, BATCH, BATCHES_PER_TASK, REF_BATCH, REF_BATCHES = 2, 3, 32, 4, 3  # 33 steps: warm-up (30) and cosine
OFFICIAL_FOLDERS = ("cil/clip", "cil/continual_clip")
LR = 7e-6  # the paper's (imagenet100_10-10-ZSCL.yaml lr); --lr raises it


def official_source(repo: Path, into: Path) -> Path:
    """The official ``cil/`` folder: ``repo``'s if it is a checkout, else its code's folders exported into ``into``
    (the mirror lacks some large data files, which the check does not read)."""
    if (repo / "cil" / "continual_clip" / "models.py").is_file():
        return repo / "cil"
    archive = subprocess.run(["git", "-C", str(repo), "archive", "HEAD", *OFFICIAL_FOLDERS], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "cil"


def import_official(source: Path):
    """``continual_clip.models`` and the official ``clip`` package, with the data-only imports stubbed."""
    omegaconf = types.ModuleType("omegaconf")
    omegaconf.DictConfig = omegaconf.OmegaConf = object
    datasets = types.ModuleType("continual_clip.datasets")
    sys.path.insert(0, str(source))
    with mock.patch.dict(sys.modules, {"omegaconf": omegaconf, "continual_clip.datasets": datasets}):
        import clip
        import clip.model
        import continual_clip.models as models
    return models, clip


class Batches:
    """What the official code gets for a DataLoader: fixed batches, fresh tensors on every pass (it shifts the
    targets in place)."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter([tuple(t.clone() for t in batch) for batch in self.batches])


class Reference(Batches):
    """What the official code gets for ``conceptual_captions``: the reference images (iterated, then its
    ``train_loader``) and the reference sentences (``train_dataset.captions``)."""

    def __init__(self, batches):
        super().__init__(batches)
        self.train_loader = Batches(batches)
        self.train_dataset = types.SimpleNamespace(captions=REF_SENTENCES)


def official_run(models, clip, initial, tasks, ref_batches, config: ZSCLConfig):
    """``ClassIncremental.train`` for each task; returns (losses per task, model after each task)."""
    learner = models.ClassIncremental.__new__(models.ClassIncremental)
    torch.nn.Module.__init__(learner)
    learner.model, learner.device, learner.prompt_template = copy.deepcopy(initial), "cpu", TEMPLATE
    learner.classes_names, learner.current_class_names = CLASS_NAMES, []
    learner.class_ids_per_task = [list(range(t * INCREMENT, (t + 1) * INCREMENT)) for t in range(len(tasks))]
    cfg = types.SimpleNamespace(method="ZSCL", lr=config.init_lr, weight_decay=config.weight_decay,
                                batch_size=BATCH, we=1, avg_freq=config.avg_freq, l2=0, ce_method=0, ls=config.ls,
                                ref_dataset="conceptual_captions", ref_sentences="conceptual_captions",
                                model_name="tiny", dataset="cifar100", increment=INCREMENT, initial_increment=INCREMENT)
    losses, models_after = [], []
    backward = torch.Tensor.backward

    def recorded(tensor, *args, **kwargs):
        losses[-1].append(float(tensor.detach()))
        return backward(tensor, *args, **kwargs)

    for task_id, batches in enumerate(tasks):
        losses.append([])
        with mock.patch.object(models, "DataLoader", lambda *_, **__: Batches(batches)), \
                mock.patch.object(models, "conceptual_captions", lambda *_, **__: Reference(ref_batches)), \
                mock.patch.object(clip, "load", lambda *_, **__: (copy.deepcopy(initial), None, None)), \
                mock.patch.object(torch.Tensor, "cuda", lambda t, *_, **__: t), \
                mock.patch.object(torch.nn.Module, "cuda", lambda m, *_, **__: m), \
                mock.patch.object(torch.Tensor, "backward", recorded):
            learner.adaptation(task_id, cfg, [None] * len(tasks), None)
        models_after.append(copy.deepcopy(learner.model))
    return losses, models_after, learner


def parameter_gaps(ours, theirs) -> dict[str, float]:
    """The largest difference of each parameter, the attention key biases apart: softmax ignores a shift of a
    query's scores, so their gradient is 0 in exact arithmetic and rounding noise in practice, which AdamW's
    normalised step turns into moves of up to the learning rate that change no output."""
    weights = dict(theirs.named_parameters())
    gaps, key_biases = {}, []
    for name, p in ours.named_parameters():
        gap = (p.detach() - weights[name].detach()).abs()
        if name.endswith("attn.in_proj_bias"):
            query, key, value = gap.chunk(3)
            key_biases.append(float(key.max()))
            gap = torch.cat([query, value])
        gaps[name] = float(gap.max())
    gaps["attention key biases"] = max(key_biases)
    return gaps


def check(repo: Path, tasks_run: int = 2, lr: float = LR) -> dict:
    import open_clip

    config = ZSCLConfig(init_lr=lr, batch_size=BATCH, ref_dataset="unused")
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(sys.stderr):
        source = official_source(repo, Path(folder))
        models, clip = import_official(source)
        torch.manual_seed(0)
        initial = clip.model.CLIP(EMBED, IMAGE, 1, VISION_WIDTH, PATCH, CONTEXT, 49408, TEXT_WIDTH, 2, 1).float().eval()
        (Path(folder) / "pilot-zscl-check-clip.json").write_text(json.dumps(TINY_CLIP))
        open_clip.add_model_config(Path(folder) / "pilot-zscl-check-clip.json")
        ours_initial = open_clip.create_model("pilot-zscl-check-clip")
        ours_initial.load_state_dict(initial.state_dict())
        ours_initial.eval().requires_grad_(False)
        tokenizer = open_clip.get_tokenizer("pilot-zscl-check-clip")
        generator = torch.Generator().manual_seed(1)
        tasks = [[(torch.randn(BATCH, 3, IMAGE, IMAGE, generator=generator),
                   torch.randint(t * INCREMENT, (t + 1) * INCREMENT, (BATCH,), generator=generator),
                   torch.zeros(BATCH, dtype=torch.long)) for _ in range(BATCHES_PER_TASK)] for t in range(tasks_run)]
        ref_batches = [(torch.randn(REF_BATCH, 3, IMAGE, IMAGE, generator=generator), torch.zeros(REF_BATCH, dtype=torch.long))
                       for _ in range(REF_BATCHES)]
        test_images = torch.randn(6, 3, IMAGE, IMAGE, generator=generator)
        official_losses, official_models, learner = official_run(models, clip, initial, tasks, ref_batches, config)

        tokens_agree = bool(torch.equal(tokenizer(REF_SENTENCES), clip.tokenize(REF_SENTENCES)))
        ours = copy.deepcopy(ours_initial).requires_grad_(True)
        with torch.no_grad():
            ref_text = F.normalize(encode_prompts(ours_initial, tokenizer, REF_SENTENCES, torch.device("cpu")), dim=-1)
        report = {"tolerance": TOLERANCE, "lr": lr, "tokens_agree": tokens_agree, "tasks": []}
        for task_id, batches in enumerate(tasks):
            names = CLASS_NAMES[task_id * INCREMENT:(task_id + 1) * INCREMENT]
            shift = task_id * INCREMENT
            losses = train_task(ours, ours_initial, ((x, y - shift) for x, y, _ in endless(batches)),
                                (x for x, _ in endless(ref_batches)), len(batches),
                                lambda: encode_prompts(ours, tokenizer, [TEMPLATE.format(n) for n in names],
                                                       torch.device("cpu"))[:, None],
                                ref_text, config, torch.device("cpu"))
            theirs = official_models[task_id]
            gaps = parameter_gaps(ours, theirs)
            seen = CLASS_NAMES[:(task_id + 1) * INCREMENT]
            with torch.no_grad():
                official_logits, _ = theirs(test_images, clip.tokenize([TEMPLATE.format(n) for n in seen]))
                text = encode_prompts(ours, tokenizer, [TEMPLATE.format(n) for n in seen], torch.device("cpu"))
                mine = zero_shot_logits(ours.encode_image(test_images), class_embeddings(text[:, None]),
                                        ours.logit_scale.exp())
            report["tasks"].append({
                "task": task_id + 1, "steps": len(losses), "official_steps": len(official_losses[task_id]),
                "first_loss": losses[0], "last_loss": losses[-1],
                "max_loss_difference": max(abs(a - b) for a, b in zip(losses, official_losses[task_id])),
                "max_relative_loss_difference": max(abs(a - b) / abs(b) for a, b in zip(losses, official_losses[task_id])),
                "max_parameter_difference": max(gap for name, gap in gaps.items() if name != "attention key biases"),
                "attention_key_bias_difference": gaps["attention key biases"],
                "max_parameter_change": max(float((p.detach() - q).abs().max()) for p, q in
                                            zip(ours.parameters(), ours_initial.parameters())),
                "max_logit_difference": float((mine - official_logits).abs().max())})
        sys.path.remove(str(source))
    report["agree"] = tokens_agree and all(
        t["steps"] == t["official_steps"] and max(t["max_relative_loss_difference"], t["max_parameter_difference"],
                                                  t["max_logit_difference"]) <= TOLERANCE for t in report["tasks"])
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zscl-repo", type=Path, default=DEFAULT_MIRROR,
                        help="the official ZSCL code: a checkout, or a bare git mirror (default %(default)s)")
    parser.add_argument("--tasks", type=int, default=2, choices=(1, 2), help="tasks of 2 classes to run (default 2)")
    parser.add_argument("--lr", type=float, default=LR, help="learning rate (default the paper's %(default)s)")
    args = parser.parse_args()
    if not args.zscl_repo.exists():
        print(f"No official ZSCL code at '{args.zscl_repo}': clone github.com/Thunderbeee/ZSCL and pass "
              f"--zscl-repo <path>.", file=sys.stderr)
        return 2
    report = check(args.zscl_repo, args.tasks, args.lr)
    print(json.dumps(report, indent=1))
    return 0 if report["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
