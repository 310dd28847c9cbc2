"""ESN's stage classifiers and their energy-based aggregation (Wang et al., AAAI 2023, iamwangyabin/ESN
``networks.py`` and ``trainer.py``).

Each task gets a ``TaskAttentionHead``: a task token (a copy of the ViT's pretrained class token) that
attends, through one class-attention block (CaiT's, as ESN's ConViT ``Block`` with ``ClassAttention``),
to the frozen ViT's output tokens, then a linear classifier over the task's classes. Training keeps a
head's free energy near an anchor (``energy_alignment_loss``) so that heads trained apart are comparable.
At test time ``EnergyVote`` picks a head per image: for each selected temperature the head with the
largest energy ``logsumexp(logits / T)``, then the most frequent of those heads.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import Mlp, trunc_normal_
from timm.models.cait import ClassAttn
from torch import nn

# The official "fast mode" temperatures (trainer.py ``candidata_temperatures``).
CANDIDATE_TEMPERATURES = (0.001, 0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
FIRST_TEMPERATURE = 0.001  # the first task's, when no earlier head exists to separate it from


class TaskAttentionHead(nn.Module):
    """Task token -> class-attention block over the backbone's tokens -> classifier (one ESN stage).

    The block: ``t = t + ClassAttn(LN([t, x]))``, ``t = t + Mlp(LN(t))`` with an MLP ratio of 0.5; its
    linear layers start from trunc_normal(0.02) and zero biases as the official ConViT code; the
    classifier is PyTorch's ``nn.Linear``.
    """

    def __init__(self, class_token: torch.Tensor, num_classes: int, num_heads: int = 12, mlp_ratio: float = 0.5):
        super().__init__()
        dim = class_token.shape[-1]
        self.task_token = nn.Parameter(class_token.detach().clone().reshape(1, 1, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ClassAttn(dim, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        for module in (self.attn, self.mlp):
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    trunc_normal_(layer.weight, std=0.02)
                    nn.init.zeros_(layer.bias)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, classes] from the backbone's output tokens [B, N, D]."""
        token = self.task_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        token = token + self.attn(self.norm1(torch.cat([token, tokens], dim=1)))
        token = token + self.mlp(self.norm2(token))
        return self.classifier(token[:, 0])


def free_energy(logits: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """``-logsumexp(-beta * logits) / beta`` per row, as the official loss computes it (the sign of the
    logits flipped inside the logsumexp)."""
    return -torch.logsumexp(-beta * logits, dim=1) / beta


def energy_alignment_loss(logits: torch.Tensor, anchor: float = -10.0, beta: float = 1.0) -> torch.Tensor:
    """mean((free_energy - anchor)^2): keeps every head's energy near the same anchor (weight it by lamda)."""
    return ((free_energy(logits, beta) - anchor) ** 2).mean()


def head_energies(head_logits: Sequence[torch.Tensor], temperatures: Sequence[float]) -> torch.Tensor:
    """``logsumexp(logits_h / T)`` of each head h at each temperature T: [B, heads, temperatures]."""
    return torch.stack([torch.stack([torch.logsumexp(logits / t, dim=1) for t in temperatures], dim=1)
                        for logits in head_logits], dim=1)


def most_frequent(values: torch.Tensor, count: int) -> torch.Tensor:
    """Per row of ``values`` [B, V] (integers in 0..count-1), the most frequent; ties to the smallest, as
    ``torch.mode`` on the CPU."""
    return torch.nn.functional.one_hot(values, count).sum(dim=1).argmax(dim=1)


class EnergyVote:
    """The temperatures ESN votes with, one selected per task, and the vote.

    Task 0 adds ``FIRST_TEMPERATURE``; task t > 0 adds the candidate under which the largest-energy head is
    head t for the most of task t's training images (``select``); the vote uses each distinct temperature once.
    """

    def __init__(self, candidates: Sequence[float] = CANDIDATE_TEMPERATURES) -> None:
        self.candidates = tuple(candidates)
        self.selected: list[float] = []

    def select(self, energies: torch.Tensor, task: int) -> float:
        """Record and return task ``task``'s temperature from its training images' energies [N, heads,
        candidates] (``head_energies`` at ``candidates``); the first best on a tie, as ``np.argmax``."""
        if task == 0:
            chosen = FIRST_TEMPERATURE
        else:
            separation = (energies.argmax(dim=1) == task).double().mean(dim=0)
            chosen = self.candidates[int(separation.argmax())]
        self.selected.append(chosen)
        return chosen

    @property
    def temperatures(self) -> list[float]:
        """The distinct selected temperatures, in the order first selected."""
        return list(dict.fromkeys(self.selected))

    def vote(self, head_logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """The head [B] that most temperatures give the largest energy."""
        winners = head_energies(head_logits, self.temperatures).argmax(dim=1)  # [B, temperatures]
        return most_frequent(winners, len(head_logits))

    def state_dict(self) -> dict:
        return {"candidates": list(self.candidates), "selected": list(self.selected)}

    def load_state_dict(self, state: dict) -> None:
        self.candidates = tuple(state["candidates"])
        self.selected = list(state["selected"])
