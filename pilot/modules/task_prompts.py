"""Task-specific prompts and what picks and shapes them (HiDe-Prompt's building blocks):

* ``TaskPrompts``: one prefix prompt per task, each started from the previous task's and, after its
  task, pulled towards the mean of the earlier ones (``prompt_momentum``);
* ``ResidualMLP``: the MLP that HiDe-Prompt puts between frozen features and a task-identity head
  (``x + MLP(x)``, then LayerNorm);
* ``prototype_contrast``: the contrastive regulariser that pushes a batch's features away from stored
  class prototypes and from each other (HiDe-Prompt's and MOS's ``orth_loss``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pilot.modules.heads import init_head

PROMPT_INITS = ("uniform", "zero")


class TaskPrompts(nn.Module):
    """``prompts`` [tasks, layers, 2, length, D]: per task, per prompted block, key and value prefixes.

    ``"uniform"`` init is U(-1, 1), as HiDe-Prompt's (and DualPrompt's) E-prompts. Feed ``forward``'s
    output to ``pilot.modules.prompting.prefixes_for_blocks``.
    """

    def __init__(self, num_tasks: int, length: int, embed_dim: int, num_layers: int, init: str = "uniform") -> None:
        super().__init__()
        if init not in PROMPT_INITS:
            raise ValueError(f"prompt init must be one of {PROMPT_INITS}, got {init!r}")
        if num_tasks < 1 or length < 1 or num_layers < 1:
            raise ValueError(f"task prompts need at least one task, token and layer, got {num_tasks}, {length}, "
                             f"{num_layers}")
        values = torch.zeros(num_tasks, num_layers, 2, length, embed_dim)
        self.prompts = nn.Parameter(nn.init.uniform_(values, -1.0, 1.0) if init == "uniform" else values)

    def forward(self, tasks: torch.Tensor) -> torch.Tensor:
        """The prompts of each sample's task ``tasks`` [B]: [B, layers, 2, length, D]."""
        return self.prompts[tasks]

    def with_momentum(self, task: int, momentum: float) -> torch.Tensor:
        """(1 - m) P_task + m mean(P_0..P_task-1), the earlier prompts as constants; P_task for the first task."""
        if task == 0 or momentum == 0:
            return self.prompts[task]
        return (1 - momentum) * self.prompts[task] + momentum * self.prompts[:task].detach().mean(0)

    @torch.no_grad()
    def start_from_previous(self, task: int) -> None:
        """P_task <- P_task-1 (the official ``shared_prompt_pool``)."""
        if task > 0:
            self.prompts[task] = self.prompts[task - 1]

    @torch.no_grad()
    def settle(self, task: int, momentum: float) -> None:
        """Keep ``with_momentum`` as the task's prompt: what it trained through is what it is tested with."""
        self.prompts[task] = self.with_momentum(task, momentum)


class ResidualMLP(nn.Module):
    """HiDe-Prompt's ``MlpMapping``: LayerNorm(x + MLP(x)); hidden widths are multiples of the input width.

    ``hidden`` [h_0, .., h_n-1] gives n + 1 linear layers D -> D h_0 -> .. -> D h_n-1 -> D, each but the last
    followed by GELU, except the middle one (index n // 2, neither first nor last), followed by LayerNorm
    instead; linear layers start as timm's (truncated normal, std 0.02; zero bias). ``hidden = []``: identity.
    """

    def __init__(self, dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        if any(width < 1 for width in hidden):
            raise ValueError(f"MLP hidden widths are multiples of the feature width, each >= 1, got {list(hidden)}")
        widths = [dim] + [dim * width for width in hidden] + [dim]
        layers = []
        for index in range(len(widths) - 1):
            linear = init_head(nn.Linear(widths[index], widths[index + 1]), "trunc_normal")
            if index == len(hidden):
                layers.append(linear)
            elif index == len(hidden) // 2 and index != 0:
                layers.append(nn.Sequential(linear, nn.LayerNorm(widths[index + 1])))
            else:
                layers.append(nn.Sequential(linear, nn.GELU()))
        self.layers = nn.Sequential(*layers) if hidden else None
        self.norm = nn.LayerNorm(dim) if hidden else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.layers is None:
            return features
        return self.norm(features + self.layers(features))


def prototype_contrast(features: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """Rows R = [prototypes; features] (prototypes constant), raw (not normalised): the cross-entropy of each
    row's similarities R R^T / temperature with the row itself as the target, averaged over all rows."""
    rows = torch.cat([prototypes.to(features).detach(), features])
    similarity = rows @ rows.T / temperature
    return F.cross_entropy(similarity, torch.arange(len(rows), device=rows.device))
