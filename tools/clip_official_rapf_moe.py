"""RAPF's and MoE-Adapters' official functions beside pilot's, on the same tensors (the check in docs/learners.md).

Official code is exported from the bare mirrors into a temp dir and imported there (read, never copied into pilot):
linlany/RAPF@81d41df continual_clip/models.py (``ClassIncrementalCLIP.mix_matrix``, ``adaptation``'s hard pairs,
``analyze_mean_cov``, ``sample``) and JiazuoYu/MoE-Adapters4CL@4572d97 cil/clip/model.py (``ResidualAttentionBlock``
with its router, noise and adapters). Missing packages (OpenAI ``clip``, ``omegaconf``) are stubbed: the functions
checked do not use them. Run from the repository root, with the two repositories fetched into /work/.mirror: ``python tools/clip_official_rapf_moe.py``.
"""
import copy
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path.cwd()))
from pilot.learners.rapf import fuse_adapter, hard_pairs  # noqa: E402
from pilot.modules.gaussians import ClassGaussians  # noqa: E402
from pilot.modules.moe import MoEAdapterSet  # noqa: E402
from open_clip.transformer import ResidualAttentionBlock as OpenClipBlock  # noqa: E402

root = Path(tempfile.mkdtemp())
for repo, paths in (("linlany+RAPF", ["continual_clip"]), ("JiazuoYu+MoE-Adapters4CL", ["cil/clip/model.py", "cil/clip/adapter.py"])):
    (root / repo).mkdir()
    archive = subprocess.run(["git", "-C", f"/work/.mirror/{repo}/repo", "archive", "HEAD", *paths], capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root / repo)], input=archive, check=True)
# MoE's two files as a package of their own (its clip/__init__ pulls in the whole OpenAI loader)
(root / "moe_official").mkdir()
for name in ("model.py", "adapter.py"):
    (root / "moe_official" / name).write_bytes((root / "JiazuoYu+MoE-Adapters4CL" / "cil" / "clip" / name).read_bytes())
(root / "moe_official" / "__init__.py").write_text("")
for name in ("clip", "omegaconf"):
    stub = types.ModuleType(name)
    stub.DictConfig = stub.OmegaConf = object
    sys.modules[name] = stub
sys.path.insert(0, str(root / "linlany+RAPF"))
from continual_clip import models as rapf_official  # noqa: E402

report = {}
torch.manual_seed(0)
dim = 16
# --- RAPF: parameter fusion ---
old, new = torch.nn.Linear(dim, dim, bias=False), torch.nn.Linear(dim, dim, bias=False)
stub = types.SimpleNamespace(adapter=copy.deepcopy(new), old_adapter=old, mix_b=0.6)
rapf_official.ClassIncrementalCLIP.mix_matrix(stub)
report["rapf fusion max|diff|"] = (stub.adapter.weight - fuse_adapter(old.weight.data, new.weight.data, 0.6)).abs().max().item()
# --- RAPF: hard pairs (adaptation, task 2 of 4 + 3 classes) ---
text = torch.nn.functional.normalize(torch.randn(7, dim) + 2.0, dim=-1)
cfg = types.SimpleNamespace(initial_increment=4, increment=3)
stub = types.SimpleNamespace(cfg=cfg, current_class_names=[], classes_names=[str(i) for i in range(7)],
                             class_ids_per_task=[list(range(4)), list(range(4, 7))], prompt_template="{}", device="cpu",
                             get_class_name_features=lambda: text)
rapf_official.clip.tokenize = lambda texts: torch.zeros(len(texts), 2, dtype=torch.long)
rapf_official.ClassIncrementalCLIP.adaptation(stub, 0, threshold=0.55)
stub.adapter = old
rapf_official.ClassIncrementalCLIP.adaptation(stub, 1, threshold=0.55)
ours = hard_pairs(text, 4, 0.55)
report["rapf hard pairs equal"] = torch.equal(stub.hard_pairs, ours)
report["rapf hard pairs"] = ours.tolist()
# --- RAPF: class statistics and sampling ---
features, labels = torch.randn(40, dim), torch.arange(4).repeat_interleave(10)
stub = types.SimpleNamespace(class_edge_distance=[], class_mean_list=[], class_cov_list=[])
rapf_official.ClassIncrementalCLIP.analyze_mean_cov(stub, features, labels)
gaussians = ClassGaussians(dim)
gaussians.add_classes(features, labels, range(4))
report["rapf mean/cov max|diff|"] = max((torch.stack(stub.class_mean_list) - gaussians.means).abs().max().item(),
                                        (torch.stack(stub.class_cov_list) - gaussians.covs).abs().max().item())
torch.manual_seed(1)
official_draw = rapf_official.sample(stub.class_mean_list[2], stub.class_cov_list[2], 20)
torch.manual_seed(1)
noise = torch.randn(20, dim)
ours = gaussians.means[2] + noise @ gaussians.cholesky_factors(torch.device("cpu"))[2].T
report["rapf sample max|diff|"] = (official_draw - ours).abs().max().item()

# --- MoE-Adapters: one block, router + noise + 2 adapters, train (noisy) and eval ---
sys.path.insert(0, str(root))
from moe_official import model as moe_official  # noqa: E402
from open_clip.model import QuickGELU  # noqa: E402

width, heads, batch, tokens = 32, 2, 5, 7
official = moe_official.ResidualAttentionBlock(width, heads, text_or_image="image")
with torch.no_grad():
    for parameter in official.parameters():  # router, noise and up-projections away from their zero init
        parameter.add_(0.3 * torch.randn_like(parameter))
stock = OpenClipBlock(width, heads, act_layer=QuickGELU)
stock.load_state_dict({k: v for k, v in official.state_dict().items() if k.split(".")[0] in ("ln_1", "attn", "mlp", "ln_2")})
transformer = torch.nn.Module()
transformer.resblocks, transformer.width, transformer.batch_first = torch.nn.ModuleList([stock]), width, True
moe = MoEAdapterSet([transformer], experts=2, top_k=2, bottleneck=64, scale=0.1, dropout=0.1)
unit = moe.units[0]
with torch.no_grad():
    unit.router.copy_(official.router_list[0])
    unit.noise_weight.copy_(official.w_noise_list[0])
    for ours_expert, theirs in zip(unit.experts, official.adaptmlp_list):
        for a, b in ((ours_expert.down, theirs.down_proj), (ours_expert.up, theirs.up_proj)):
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)
x = torch.randn(batch, tokens, width)
for mode, noisy in (("eval, no noise", False), ("train, noisy gates and dropout", True)):
    official.train(noisy)
    official.is_train = noisy  # the code fixes it at True when built; set here to compare both paths
    moe.train(noisy)
    moe.noisy = noisy
    torch.manual_seed(3)
    theirs = official(x.transpose(0, 1)).transpose(0, 1)
    torch.manual_seed(3)
    with moe.switched_on():
        ours = stock(x)
    report[f"moe block ({mode}) max|diff|"] = (theirs - ours).abs().max().item()
    report[f"moe block ({mode}) max|adapter branch| (not vacuous)"] = (ours - stock(x)).abs().max().item()
for key, value in report.items():
    print(f"{key}: {value}")
