"""Run LAMDA-PILOT itself on protocol P1 on this CPU, for side-by-side gaps with pilot's PILOT profile.

The script exports LAMDA-PILOT at a pinned commit into a work folder outside this repository and
applies the few named edits it needs to run here (``EDITS``): the local CIFAR-100 pickles and P1's
per-class subset, the first ``max_tasks`` tasks, DeiT-Tiny from a local file instead of ViT-B/16
(and 192 for the ViT-B widths written as 768, where a learner needs it). PILOT's ``device: [-1]`` is
its CPU; one edit is for the CPU alone (CODA-Prompt sums its prompt loss in place into a tensor that is
a leaf only there). It then writes each learner's P1 config from PILOT's own
``exps/<learner>.json`` with the keys of this repo's ``exps/<learner>_p1.json`` laid over it, runs
PILOT's ``main.py`` under ``/usr/bin/time -v`` and records its accuracy curve (PILOT's "CNN top1
curve", its reported accuracy for these learners; for the memory learners iCaRL and DER also its
"NME top1 curve"), Ā, last, wall time and peak RSS in ``--out`` after every run. ``--ablate NAME``
adds one of ``ABLATIONS`` (a PILOT behaviour switched to pilot's) in its own work copy.

Each edit is ``(file, old text, new text, why)`` and must match exactly once in the pinned export,
so a changed PILOT is noticed instead of silently patched. Nothing from PILOT is copied into this
repository. Usage (one heavy run at a time; PILOT needs timm 0.6.x, 0.6.13 is the first that
imports on Python 3.11, and easydict, installed into a separate venv):

    python -m venv --system-site-packages /work/lamda_venv
    /work/lamda_venv/bin/pip install --no-deps timm==0.6.13 easydict
    python tools/lamda_pilot.py --python /work/lamda_venv/bin/python \\
        --assets ../shared/assets --learners simplecil lae --out /work/runs21/lamda.json

``--prepare`` exports and edits only (and writes the configs); ``--set key=value`` (JSON values)
lays extra keys over every learner's config, for ablations; ``--keep-src`` re-reads the work
copy instead of re-exporting, so a hand edit made for an ablation survives.
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "264745534fc2233f5a50b020e50a3472c47eb756"
MIRROR = Path("/work/.mirror/sun-hailong+LAMDA-PILOT/repo")
LEARNERS = ["simplecil", "l2p", "dualprompt", "ranpac", "lae", "coda_prompt", "slca", "cofima", "aper_adapter",
            "fecam", "icarl", "der", "ease", "mos", "aper_ssf", "aper_vpt_deep", "aper_vpt_shallow", "aper_finetune",
            "finetune"]
PILOT_EXPS = {"aper_adapter": "aper_aperpter"}  # PILOT's file names where they differ from the learner's
# PILOT's backbone_type for DeiT-Tiny: where PILOT registers a ViT-Ti variant of the learner's model
# (L2P, DualPrompt, CODA-Prompt, LAE) its name, else PILOT's own name (the edits below build ViT-Ti).
BACKBONES = {"l2p": "vit_tiny_patch16_224_l2p", "dualprompt": "vit_tiny_patch16_224_dualprompt",
             "coda_prompt": "vit_tiny_patch16_224_coda_prompt", "lae": "vit_tiny_patch16_224_lae"}
WEIGHTS_VARIANT = "vit_tiny_patch16_224"  # timm's name for the ViT-Ti/16 layout the DeiT-Tiny file has


@dataclass(frozen=True)
class Edit:
    name: str
    file: str
    old: str
    new: str
    why: str


def vit_ti_loader(name: str, file: str, function: str, checkpoint_line: str) -> Edit:
    """The edit that turns one of PILOT's ViT-B/16 builders (a VisionTransformer of its own with separate
    q/k/v projections, filled from timm's ViT-B/16) into ViT-Ti/16 filled from timm's ViT-Ti/16, that is
    the DeiT-Tiny file: the adapter, EASE and MOS backbones share this code, each in its own file."""
    old = (f"def {function}(pretrained=False, **kwargs):\n    \n"
           "    model = VisionTransformer(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4, "
           "qkv_bias=True,\n        norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)\n\n"
           "    # checkpoint_model = torch.load('./pretrained_models/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0"
           f"-sd_0.0.npz')\n    {checkpoint_line}\n"
           "    state_dict = checkpoint_model.state_dict()\n")
    old += """    # modify the checkpoint state dict to match the model
    # first, split qkv weight into q, k, v
    for key in list(state_dict.keys()):
        if 'qkv.weight' in key:
            qkv_weight = state_dict.pop(key)
            q_weight = qkv_weight[:768]
            k_weight = qkv_weight[768:768*2]
            v_weight = qkv_weight[768*2:]
            state_dict[key.replace('qkv.weight', 'q_proj.weight')] = q_weight
            state_dict[key.replace('qkv.weight', 'k_proj.weight')] = k_weight
            state_dict[key.replace('qkv.weight', 'v_proj.weight')] = v_weight
        elif 'qkv.bias' in key:
            qkv_bias = state_dict.pop(key)
            q_bias = qkv_bias[:768]
            k_bias = qkv_bias[768:768*2]
            v_bias = qkv_bias[768*2:]
"""
    new = (old.replace("768", "192").replace("num_heads=12", "num_heads=3")
           .replace('"vit_base_patch16_224"', '"vit_tiny_patch16_224"')
           .replace("    \n", "    # lamda_pilot.py: ViT-Ti/16 (width 192, 3 heads) with the DeiT-Tiny weights\n", 1))
    return Edit(name, file, old, new,
                why="DeiT-Tiny instead of ViT-B/16: width, heads, the weights' source and the q/k/v split")


def vit_ti_width(name: str, file: str, old: str, why: str) -> Edit:
    """The edit that sets ViT-B/16's width, 768 in each line of ``old`` that has it, to ViT-Ti/16's 192."""
    new = "".join(line.replace("768", "192") + ("  # lamda_pilot.py: ViT-Ti" if "768" in line else "") + "\n"
                  for line in old.splitlines())
    return Edit(name, file, old, new, why)


EDITS = [
    Edit("local CIFAR-100 and the P1 subset", "utils/data.py",
         old='''        self.class_order = np.arange(100).tolist()

    def download_data(self):
        train_dataset = datasets.cifar.CIFAR100("./data", train=True, download=True)
        test_dataset = datasets.cifar.CIFAR100("./data", train=False, download=True)
        self.train_data, self.train_targets = train_dataset.data, np.array(
            train_dataset.targets
        )
        self.test_data, self.test_targets = test_dataset.data, np.array(
            test_dataset.targets
        )
''',
         new='''        self.class_order = np.arange(100).tolist()

    def download_data(self):
        # lamda_pilot.py: read the CIFAR-100 pickles from args["data_path"] as torchvision would
        # (HWC uint8, fine labels) and keep the first train/test_per_class images of each class,
        # in the file's order (pilot's first_per_class)
        import os, pickle
        def read(part, limit):
            with open(os.path.join(self.args["data_path"], "cifar-100-python", part), "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            data = entry["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            targets = np.array(entry["fine_labels"])
            keep = np.zeros(len(targets), dtype=bool)
            for label in np.unique(targets):
                keep[np.flatnonzero(targets == label)[:limit] if limit else np.flatnonzero(targets == label)] = True
            return data[keep], targets[keep]
        self.train_data, self.train_targets = read("train", self.args.get("train_per_class", 0))
        self.test_data, self.test_targets = read("test", self.args.get("test_per_class", 0))
''',
         why="no internet here, and torchvision's CIFAR100(download=False) refuses the local files at its md5 check; "
             "P1 trains on the first 50 and tests on the first 10 images of each class"),
    Edit("the first max_tasks tasks", "trainer.py",
         old="    for task in range(data_manager.nb_tasks):\n",
         new='    for task in range(args.get("max_tasks") or data_manager.nb_tasks):  # lamda_pilot.py: P1\'s 3 tasks\n',
         why="P1 stops after 3 tasks; nb_tasks stays 10, as methods size per-task slices by it (pilot's planned_tasks)"),
    Edit("DeiT-Tiny weights from a local file", "main.py",
         old="from trainer import train\n",
         new="from trainer import train\n"
             "import os  # lamda_pilot.py: timm's ViT-Ti/16 weights come from $LAMDA_PILOT_WEIGHTS (DeiT-Tiny)\n"
             "from timm.models.registry import _model_pretrained_cfgs\n"
             f"_model_pretrained_cfgs['{WEIGHTS_VARIANT}'].update(url='', hf_hub_id=None,"
             " file=os.environ['LAMDA_PILOT_WEIGHTS'])\n",
         why="no model hub here: every PILOT backbone built on timm's vit_tiny_patch16_224 variant (its own registered "
             "ViT-Ti models, or timm's) loads the DeiT-Tiny file instead of downloading"),
    Edit("SimpleCIL/SLCA/CoFiMA/iCaRL/DER backbone: ViT-Ti", "utils/inc_net.py",
         old='''        model = timm.create_model("vit_base_patch16_224",pretrained=True, num_classes=0)
        model.out_dim = 768
''',
         new='''        model = timm.create_model("vit_tiny_patch16_224",pretrained=True, num_classes=0)  # lamda_pilot.py
        model.out_dim = 192
''',
         why="DeiT-Tiny (ViT-Ti/16, width 192) instead of ViT-B/16 (iCaRL's IncrementalNet and each of DER's "
             "backbones are built here too; DERNet reads its widths from out_dim)"),
    vit_ti_width("adapter backbone (APER, RanPAC, FeCAM): d_model", "utils/inc_net.py",
                 old='''                d_model=768,
                # VPT related
                vpt_on=False,
                vpt_num=0,
            )
''',
                 why="the adapters' width is the ViT's"),
    vit_ti_width("adapter backbone (APER, RanPAC, FeCAM): out_dim", "utils/inc_net.py",
                 old='''                model = vit_adapter.vit_base_patch16_224_adapter(num_classes=0,
                    global_pool=False, drop_path_rate=0.0, tuning_config=tuning_config)
                model.out_dim=768
''',
                 why="feature width of ViT-Ti"),
    vit_ti_loader("adapter backbone (APER, RanPAC, FeCAM): ViT-Ti and its weights", "backbone/vit_adapter.py",
                  "vit_base_patch16_224_adapter", 'checkpoint_model=timm.create_model("vit_base_patch16_224", '
                  'pretrained=True, num_classes=0)'),
    vit_ti_width("LAE: feature width", "utils/inc_net.py",
                 old='''        self.backbone = get_backbone(args, pretrained=pretrained)
        self.backbone.out_dim = 768
''',
                 why="LAE's head is built on out_dim"),
    Edit("CODA-Prompt: widths", "utils/inc_net.py",
         old='''        self.fc = nn.Linear(768, args["nb_classes"])
        self.prompt = CodaPrompt(768, args["nb_tasks"], args["prompt_param"])
''',
         new='''        self.fc = nn.Linear(192, args["nb_classes"])  # lamda_pilot.py: ViT-Ti
        self.prompt = CodaPrompt(192, args["nb_tasks"], args["prompt_param"], key_dim=192)
''',
         why="CODA-Prompt's head, prompts and keys (key_dim defaults to 768) at ViT-Ti's width"),
    Edit("CODA-Prompt: no head in the DeiT-Tiny file's load", "backbone/vit_coda_promtpt.py",
         old="        elif 'pre_logits' in k:\n",
         new="        elif 'pre_logits' in k or k.startswith('head.'):  # lamda_pilot.py: this ViT has no head\n",
         why="CODA's ViT has no head module; PILOT's ViT-B .npz goes through timm's custom loader, which reads the "
             "backbone's weights only, while the local .pth goes through load_state_dict(strict=True), which refuses "
             "the file's ImageNet head.weight/head.bias (the backbone's weights still load strictly)"),
    Edit("CODA-Prompt: prompt loss summed out of place", "backbone/vit_coda_promtpt.py",
         old="                    prompt_loss += loss\n",
         new="                    prompt_loss = prompt_loss + loss  # lamda_pilot.py: a leaf on the CPU\n",
         why="prompt_loss = torch.zeros((1,), requires_grad=True).to(x.device) is a copy (not a leaf) on a GPU but the "
             "same leaf on the CPU, where `+=` raises 'a leaf Variable that requires grad is being used in an in-place "
             "operation'; the sum and its gradient are the same"),
    vit_ti_width("EASE: adapter width", "utils/inc_net.py",
                 old='''                d_model=768,
                # VPT related
                vpt_on=False,
                vpt_num=0,
                _device = args["device"][0]
''',
                 why="EASE's adapters' width is the ViT's"),
    vit_ti_width("EASE: out_dim", "utils/inc_net.py",
                 old='''                model = vit_ease.vit_base_patch16_224_ease(num_classes=0,
                    global_pool=False, drop_path_rate=0.0, tuning_config=tuning_config)
                model.out_dim=768
''',
                 why="EaseNet sizes its prototype heads and each task's feature slice by out_dim"),
    vit_ti_loader("EASE backbone: ViT-Ti and its weights", "backbone/vit_ease.py", "vit_base_patch16_224_ease",
                  'checkpoint_model=timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=0)'),
    vit_ti_width("EASE: reweighted logits' block width", "backbone/linears.py",
                 old="inc=10, out_dim=768, use_init_ptm=False):\n",
                 why="EASE's test logits (use_reweight) cut the concatenated features into out_dim-wide blocks, one per "
             "adapter; EaseNet leaves out_dim at this default, ViT-B's width"),
    vit_ti_width("MOS: adapter width", "utils/inc_net.py",
                 old='''                d_model=768,
                _device = args["device"][0],
''',
                 why="MOS's adapters' width is the ViT's"),
    vit_ti_width("MOS: out_dim", "utils/inc_net.py",
                 old="        self.backbone = get_backbone(args, pretrained)\n        self.backbone.out_dim = 768\n",
                 why="MOSNet's cosine head and its classifier alignment's feature statistics are out_dim wide"),
    vit_ti_loader("MOS backbone: ViT-Ti and its weights", "backbone/vit_mos.py", "vit_base_patch16_224_mos",
                  'checkpoint_model = timm.create_model("vit_base_patch16_224", pretrained=True, '
                  "num_classes=kwargs['num_classes'])"),
    Edit("APER-SSF backbone: ViT-Ti", "utils/inc_net.py",
         old='''                model = timm.create_model("vit_base_patch16_224_ssf", pretrained=True, num_classes=0)
                model.out_dim = 768
''',
         new='''                model = timm.create_model("vit_tiny_patch16_224_ssf", pretrained=True, num_classes=0,
                                          pretrained_strict=False)  # lamda_pilot.py: ViT-Ti; SSF's own are new
                model.out_dim = 192
''',
         why="PILOT's ViT-Ti variant of its SSF ViT; PILOT's ViT-B .npz goes through timm's custom loader, which fills "
             "the backbone and leaves SSF's scales and shifts at their init, while the local .pth goes through "
             "load_state_dict, strict by default, which refuses a checkpoint without them (the file's keys are the "
             "backbone's, all loaded)"),
    Edit("APER-VPT backbone: ViT-Ti weights", "utils/inc_net.py",
         old='''                basicmodelname = "vit_base_patch16_224" \n''',
         new='''                basicmodelname = "vit_tiny_patch16_224"  # lamda_pilot.py: ViT-Ti\n''',
         why="VPT's ViT is filled from this timm model's weights: the DeiT-Tiny file"),
    vit_ti_width("APER-VPT backbone: out_dim", "utils/inc_net.py",
                 old="            model.load_prompt(prompt_state_dict)\n            model.out_dim = 768\n",
                 why="feature width of ViT-Ti"),
    Edit("APER-VPT backbone: ViT-Ti layout", "backbone/vpt.py",
         old="    model = VPT_ViT(Prompt_Token_num=Prompt_Token_num,VPT_type=VPT_type)\n",
         new="    model = VPT_ViT(Prompt_Token_num=Prompt_Token_num,VPT_type=VPT_type,\n"
             "                    embed_dim=192, num_heads=3)  # lamda_pilot.py: ViT-Ti/16\n",
         why="VPT_ViT's defaults are ViT-B/16's (width 768, 12 heads); its prompt tokens take the width too"),
]


# PILOT-side ablations (``--ablate NAME``, run in their own work copy src-NAME): each switches one PILOT
# behaviour to what pilot does, to measure what a difference is worth. Not needed to run PILOT.
ABLATIONS = {
    "lae_normal_head": [Edit("LAE head N(0, 0.001)", "utils/inc_net.py",
        old="        fc = SimpleLinear(in_dim, out_dim)\n        return fc\n\nclass MOSNet",
        new="        fc = SimpleLinear(in_dim, out_dim)\n        nn.init.normal_(fc.weight, std=0.001)\n        return fc\n\nclass MOSNet",
        why="pilot's (the official) head init instead of SimpleLinear's kaiming_uniform")],
    "lae_official_rules": [
        Edit("LAE: PET trains in every epoch of the first task", "models/lae.py",
             old="        for p in self._network.pets.parameters():\n            p.requires_grad_(False)\n",
             new="        for p in self._network.pets.parameters():\n            p.requires_grad_(self._cur_task == 0)\n",
             why="official/pilot: the PET is frozen for num_freeze_epochs from the second task only"),
        Edit("LAE: offline PET copied from the online one when task 2 starts, EMA from then", "models/lae.py",
             old="        self._network.attach_pets_vit(self._network.pets)\n        for p in self._network.pets.parameters():",
             new="        self._network.attach_pets_vit(self._network.pets)\n"
                 "        if self._cur_task == 1:\n"
                 "            self._network.pets_emas.load_state_dict(self._network.pets.state_dict())\n"
                 "        for p in self._network.pets.parameters():",
             why="official/pilot: the offline PET starts as the online one after the first task"),
        Edit("LAE: no EMA in the first task", "models/lae.py",
             old="                for param,param_ema in zip(",
             new="                for param,param_ema in zip([] if self._cur_task == 0 else",
             why="official/pilot: the offline PET exists from the second task on"),
        Edit("LAE: the online PET alone predicts in the first task", "models/lae.py",
             old="            self._network.attach_pets_vit(self._network.pets_emas)\n            # using off_model to predict\n"
                 "            with torch.no_grad():\n                outputs = self._network(inputs)[\"logits\"][:, :self._total_classes]\n",
             new="            self._network.attach_pets_vit(self._network.pets_emas)\n            # using off_model to predict\n"
                 "            with torch.no_grad():\n                outputs = self._network(inputs)[\"logits\"][:, :self._total_classes]\n"
                 "            if self._cur_task == 0:\n                outputs = output_emas[0].log()\n",
             why="official/pilot: before task 2 there is no offline PET (log of the online softmax: same max)"),
    ],
    "dualprompt_permute": [Edit("DualPrompt: E-prompt key/value prefixes kept apart", "backbone/prompt.py",
        old="""                batched_prompt = batched_prompt_raw.reshape(
                    num_layers, batch_size, dual, top_k * length, num_heads, heads_embed_dim
                )""",
        new="""                batched_prompt = batched_prompt_raw.permute(0, 2, 1, 3, 4, 5, 6).reshape(
                    num_layers, batch_size, dual, top_k * length, num_heads, heads_embed_dim
                )""",
        why="PILOT reshapes [layers, 2, B, ...] to [layers, B, 2, ...] without a permute: half of each batch gets "
            "the key prefix as both key and value, the other half the value prefix; pilot keeps them apart")],
    "ranpac_linear_readout": [Edit("RanPAC: logits h @ W_o", "utils/inc_net.py",
        old="            x = torch.nn.functional.relu(x @ self.W_rand)\n        out = self.fc(x)\n",
        new="            x = torch.nn.functional.relu(x @ self.W_rand)\n"
            "            out = {\"logits\": x @ self.fc.weight.T}\n            out.update({\"features\": x})\n"
            "            return out\n        out = self.fc(x)\n",
        why="pilot (and the official RanPAC) score h @ W_o; PILOT's cosine head normalises h and each class's W_o row")],
}

def export(mirror: Path, commit: str, dest: Path) -> Path:
    """A fresh copy of PILOT at ``commit`` in ``dest`` (removed first)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(mirror), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def apply_edits(src: Path, edits=EDITS) -> list[str]:
    """Apply each edit; each ``old`` must occur exactly once (else ValueError naming the edit)."""
    for edit in edits:
        path = src / edit.file
        text = path.read_text()
        count = text.count(edit.old)
        if count != 1:
            raise ValueError(f"edit '{edit.name}': its old text occurs {count} times in {edit.file}, not once: "
                             f"PILOT changed; review the edit")
        path.write_text(text.replace(edit.old, edit.new))
    return [edit.name for edit in edits]


def p1_config(src: Path, learner: str, data_path: Path, extra: dict | None = None) -> dict:
    """PILOT's ``exps/<learner>.json`` with every key of this repo's ``exps/<learner>_p1.json`` laid over it,
    except the device (PILOT's CPU is -1), the backbone (PILOT's ViT-Ti name) and the prefix."""
    config = json.loads((src / "exps" / f"{PILOT_EXPS.get(learner, learner)}.json").read_text())
    p1 = json.loads((ROOT / "exps" / f"{learner}_p1.json").read_text())
    for key, value in p1.items():
        if key.startswith("_") or key in ("device", "backbone_type"):
            continue
        config[key] = value
    config.update(device=[-1], backbone_type=BACKBONES.get(learner, config["backbone_type"]), prefix="p1",
                  data_path=str(data_path))
    config.update(extra or {})
    return config


def _numbers(listing: str) -> list[float]:
    """``[87.0, np.float64(80.0)]`` (NumPy 2 reprs included) -> [87.0, 80.0]."""
    return [float(x) for x in ast.literal_eval(re.sub(r"np\.\w+\(([^()]*)\)", r"\1", listing))]


def parse_log(text: str) -> dict:
    """The last "CNN top1 curve" (and "NME top1 curve", where PILOT logs one) in PILOT's log."""
    curves = {}
    for kind in ("CNN", "NME"):
        found = re.findall(rf"{kind} top1 curve: (\[.*?\])\s*$", text, flags=re.M)
        curves[kind.lower()] = _numbers(found[-1]) if found else None
    return curves


def parse_time(stderr: str) -> dict:
    """Wall time (s) and peak RSS (GiB) from ``/usr/bin/time -v``."""
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    seconds = None
    if wall:
        seconds = 0.0
        for part in wall.group(1).split(":"):
            seconds = seconds * 60 + float(part)
    return {"wall_s": seconds, "peak_rss_gib": int(rss.group(1)) / 2**20 if rss else None}


def prepare_assets(assets: Path, work: Path) -> tuple[Path, Path]:
    """The CIFAR-100 archive extracted, and the DeiT-Tiny safetensors as a torch file (timm 0.6 reads .pth)."""
    data = work / "data"
    if not (data / "cifar-100-python" / "train").is_file():
        data.mkdir(parents=True, exist_ok=True)
        with tarfile.open(assets / "cifar-100-python.tar.gz") as archive:
            archive.extractall(data, filter="data")
    weights = work / "weights" / f"{WEIGHTS_VARIANT}.pth"
    if not weights.is_file():
        import torch
        from safetensors.torch import load_file
        weights.parent.mkdir(parents=True, exist_ok=True)
        torch.save(load_file(str(assets / "deit_tiny_patch16_224.safetensors")), weights)
    return data, weights


def run_learner(python: str, src: Path, run_dir: Path, config: dict, weights: Path) -> dict:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    env = {**__import__("os").environ, "LAMDA_PILOT_WEIGHTS": str(weights), "PYTHONWARNINGS": "ignore"}
    started = time.time()
    with open(run_dir / "stdout.log", "w") as out, open(run_dir / "time.log", "w") as err:
        proc = subprocess.run(["/usr/bin/time", "-v", python, str(src / "main.py"), "--config", "config.json"],
                              cwd=run_dir, env=env, stdout=out, stderr=err)
    log = (run_dir / "stdout.log").read_text()
    curves = parse_log(log)
    row = {"learner": config["model_name"], "returncode": proc.returncode, "curve": curves["cnn"],
           "nme_curve": curves["nme"], "run_dir": str(run_dir), "started": time.strftime("%Y-%m-%d %H:%M:%S",
                                                                                        time.localtime(started)),
           **parse_time((run_dir / "time.log").read_text())}
    if row["curve"]:
        row["average"] = sum(row["curve"]) / len(row["curve"])
        row["last"] = row["curve"][-1]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mirror", type=Path, default=MIRROR, help="PILOT's git directory")
    parser.add_argument("--commit", default=COMMIT)
    parser.add_argument("--work", type=Path, help="work folder outside the repo (default /work/lamda/<commit>)")
    parser.add_argument("--assets", type=Path, default=ROOT.parent / "shared" / "assets")
    parser.add_argument("--python", default=sys.executable, help="a Python with timm 0.6.x and easydict")
    parser.add_argument("--learners", nargs="+", default=LEARNERS, choices=LEARNERS)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="extra config key")
    parser.add_argument("--tag", default="", help="suffix of the run folders (for ablations)")
    parser.add_argument("--ablate", choices=sorted(ABLATIONS), help="one PILOT-side ablation (own work copy)")
    parser.add_argument("--out", type=Path, default=Path("lamda_pilot.json"))
    parser.add_argument("--prepare", action="store_true", help="export, edit and write configs only")
    parser.add_argument("--keep-src", action="store_true", help="keep the existing (edited) work copy")
    args = parser.parse_args()
    work = args.work or Path("/work/lamda") / args.commit
    if ROOT in work.resolve().parents or work.resolve() == ROOT:
        parser.error("keep PILOT's code outside this repository")
    src = work / ("src" + (f"-{args.ablate}" if args.ablate else ""))
    tag = "-".join(filter(None, [args.ablate, args.tag]))
    if not (args.keep_src and src.is_dir()):
        export(args.mirror, args.commit, src)
        print("edits:", *apply_edits(src), sep="\n  ", flush=True)
        if args.ablate:
            print("ablation edits:", *apply_edits(src, ABLATIONS[args.ablate]), sep="\n  ", flush=True)
    data, weights = prepare_assets(args.assets, work)
    extra = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"commit": args.commit, "runs": {}}
    for learner in args.learners:
        config = p1_config(src, learner, data, extra)
        run_dir = work / "runs" / (learner + (f"-{tag}" if tag else ""))
        if args.prepare:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(json.dumps(config, indent=2))
            continue
        row = run_learner(args.python, src, run_dir, config, weights)
        row.update(set=extra, ablation=args.ablate)
        results["runs"][learner + (f"-{tag}" if tag else "")] = row
        args.out.write_text(json.dumps(results, indent=2))
        print(f"{learner}: rc {row['returncode']} curve {row['curve']} Ā {row.get('average')} "
              f"wall {row['wall_s']} s peak {row['peak_rss_gib']} GiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
