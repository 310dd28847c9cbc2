"""Low-rank adaptation (LoRA) of the fused ``qkv`` projection of timm's stock ViT attention.

timm's ``Attention`` computes queries, keys and values with one ``nn.Linear`` (``attn.qkv``, output
``[q | k | v]``, each ``embed_dim`` wide). A ``LoRASet`` adds, by a forward hook on that Linear, low-rank
deltas to the slices a method chooses (InfLoRA: k, v; SD-LoRA: q, v), as both official codes do:
``qkv(x)[slice] += sum_t m_t * B_t A_t x / n_t``, where for every pair ``t`` (one per task)

* ``A_t`` (``down``, ``[rank, dim]``) and ``B_t`` (``up``, ``[dim, rank]``) are the pair's matrices per block and slice;
* ``m_t`` is the pair's magnitude, one scalar shared by every block and slice (1 and fixed unless a method
  trains it: SD-LoRA's magnitudes);
* ``n_t`` is 1, or ``||B_t||_F * ||A_t||_F`` once the pair is ``normalised`` (SD-LoRA's frozen directions).

The set holds no copy of the ViT, which keeps timm's weights and keys; the low-rank products are computed on
the Linear's input (no second pass through the backbone); ``enabled = False`` (or ``with lora.disabled():``)
gives the stock output exactly. A pair's matrices can be frozen (``freeze_pair``), the deltas merged into a
stock ViT's ``qkv`` weights for deployment (``merge_into``), the inputs of every ``qkv`` recorded
(``record_inputs``: InfLoRA's input matrices), the newest pair removed (``remove_last_pair``), and the pairs'
directions compared by least squares (``direction_gram``, ``fit_last_direction``: SD-LoRA-KD). ``state_dict()``
holds the pairs, magnitudes and normalisation flags; loading one grows the set to the pairs it holds, with their
ranks.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from pilot.modules.adapters import _blocks, _HookedAdaptation, _Unit

QKV_SLICES = ("q", "k", "v")  # timm's order of the fused projection's output


class LowRankPair(nn.Module):
    """``delta W = up @ down``: ``down`` (A) ``[rank, dim]`` drawn as ``nn.Linear`` draws its weight (Kaiming
    uniform, a = sqrt(5): both official codes), ``up`` (B) ``[dim, rank]`` zero, so a new pair changes nothing."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, dim))
        self.up = nn.Parameter(torch.zeros(dim, rank))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def norm_product(self) -> torch.Tensor:
        """``||B||_F * ||A||_F``: what SD-LoRA divides a frozen pair by to get its direction."""
        return self.up.norm() * self.down.norm()


class QKVLoRA(_Unit):
    """The pairs of one block: ``pairs[t][slice]`` is a ``LowRankPair``; ``recording`` accumulates the inputs'
    second moment ``sum x^T x`` over tokens while on."""

    def __init__(self, dim: int, slices: Sequence[str]) -> None:
        super().__init__()
        self.dim = dim
        self.slices = tuple(name for name in QKV_SLICES if name in slices)  # in the projection's order
        self.pairs = nn.ModuleList()
        self.recording = False
        self.input_moment: torch.Tensor | None = None
        self.input_tokens = 0

    def add(self, rank: int) -> None:
        self.pairs.append(nn.ModuleDict({name: LowRankPair(self.dim, rank) for name in self.slices}))

    def record(self, x: torch.Tensor) -> None:
        tokens = x.detach().reshape(-1, x.shape[-1]).float()
        moment = tokens.T @ tokens
        self.input_moment = moment if self.input_moment is None else self.input_moment + moment
        self.input_tokens += tokens.shape[0]

    def factor(self, index: int, name: str, magnitudes: Sequence[torch.Tensor], normalised: Sequence[bool]):
        """What pair ``index`` of slice ``name`` is multiplied by: its magnitude, over ``||B|| ||A||`` if normalised."""
        pair = self.pairs[index][name]
        return magnitudes[index] / pair.norm_product() if normalised[index] else magnitudes[index]

    def stacked(self, magnitudes: Sequence[torch.Tensor], normalised: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        """All pairs as one low-rank product ``ups.T @ down``: ``down`` ``[R, dim]`` stacks every slice's and pair's A;
        ``ups`` ``[R, 3 dim]`` holds each slice's scaled B^T in that slice's rows and columns, zero elsewhere. (Laid
        out ``[R, 3 dim]``, not ``[3 dim, R]``: CPU matrix products with the narrow side last run several times
        slower in the backward pass.)"""
        down = torch.cat([pair[name].down for name in self.slices for pair in self.pairs])
        blocks = [torch.cat([(pair[name].up * self.factor(index, name, magnitudes, normalised)).T
                             for index, pair in enumerate(self.pairs)]) for name in self.slices]
        diagonal = torch.block_diag(*blocks)  # [R, len(slices) dim], slice columns in QKV order
        columns = iter(diagonal.split(self.dim, dim=1))
        ups = torch.cat([next(columns) if name in self.slices else diagonal.new_zeros(diagonal.shape[0], self.dim)
                         for name in QKV_SLICES], dim=1)
        return down, ups

    def add_deltas(self, magnitudes: Sequence[torch.Tensor], normalised: Sequence[bool], qkv: nn.Module,
                   args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """Forward hook on ``attn.qkv``: the stock output plus ``(x A^T) U`` for all pairs and slices at once (two
        matrix products, the second fused with the addition: ``stacked``)."""
        x = args[0]
        if self.recording:
            self.record(x)
        if not self.active or not len(self.pairs):
            return None
        down, ups = self.stacked(magnitudes, normalised)
        low = F.linear(x.reshape(-1, x.shape[-1]), down.to(x.dtype))
        return torch.addmm(output.reshape(-1, output.shape[-1]), low, ups.to(low.dtype)).view(output.shape)

    def delta_weight(self, magnitudes: Sequence[torch.Tensor], normalised: Sequence[bool]) -> torch.Tensor:
        """The dense ``[3 dim, dim]`` change of the qkv weight that the pairs make."""
        down, ups = self.stacked(magnitudes, normalised)
        return ups.T @ down


class LoRASet(_HookedAdaptation):
    """LoRA on the chosen slices of every block's ``attn.qkv``; build it with ``attach_lora``."""

    def __init__(self, vit: nn.Module, slices: Sequence[str]) -> None:
        linears = [_qkv_linear(block) for block in _blocks(vit)]
        super().__init__(nn.ModuleList(QKVLoRA(linear.in_features, slices) for linear in linears))
        self.slices = self.units[0].slices
        self.magnitudes = nn.ParameterList()  # one scalar per pair, shared by every block and slice
        self.normalised: list[bool] = []  # per pair (a list, not a tensor: read in every forward without a sync)
        self.register_buffer("anchor", torch.empty(0), persistent=False)  # where .to() moved the set: new pairs go there
        for linear, unit in zip(linears, self.units):
            self._handles.append(linear.register_forward_hook(partial(self._add_deltas, unit)))
        self.register_load_state_dict_pre_hook(self._grow_to_saved)

    def _add_deltas(self, unit: QKVLoRA, qkv: nn.Module, args: tuple, output: torch.Tensor):
        return unit.add_deltas(self.magnitudes, self.normalised, qkv, args, output)

    # --- pairs ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.magnitudes)

    def add_pair(self, rank: int, magnitude: float = 1.0) -> int:
        """A new pair in every block and slice (B = 0: the output is unchanged), magnitude fixed until a method
        lets it train; returns its index."""
        if rank < 1:
            raise ValueError(f"a LoRA rank must be a positive integer, got {rank}")
        device = self.anchor.device
        for unit in self.units:
            unit.add(rank)
            unit.pairs[-1].to(device)
        self.magnitudes.append(nn.Parameter(torch.tensor(float(magnitude), device=device), requires_grad=False))
        self.normalised.append(False)
        return len(self) - 1

    def pair(self, index: int, name: str) -> list[LowRankPair]:
        """Pair ``index`` of slice ``name``, one per block."""
        return [unit.pairs[index][name] for unit in self.units]

    def pair_parameters(self, index: int, which: Sequence[str] = ("down", "up")) -> list[nn.Parameter]:
        """The ``down`` and/or ``up`` matrices of pair ``index`` over every block and slice."""
        return [getattr(pair, part) for name in self.slices for pair in self.pair(index, name) for part in which]

    def freeze_pair(self, index: int) -> None:
        for parameter in self.pair_parameters(index):
            parameter.requires_grad_(False)

    def normalise_pair(self, index: int) -> None:
        """From now on pair ``index`` contributes ``m * BA / (||B||_F ||A||_F)``: its direction times its magnitude."""
        self.normalised[index] = True

    def remove_last_pair(self) -> None:
        """Drop the newest pair (its matrices in every block and slice, its magnitude and flag)."""
        for unit in self.units:
            del unit.pairs[-1]
        self.magnitudes = nn.ParameterList(list(self.magnitudes)[:-1])
        self.normalised.pop()

    @torch.no_grad()
    def direction_gram(self) -> torch.Tensor:
        """``G[i, j] = <d_i, d_j>`` (float64, on the CPU), where ``d_i`` stacks pair i's direction
        ``B_i A_i / (||B_i||_F ||A_i||_F)`` of every block and slice into one vector (zero where B or A is zero).
        From the low-rank factors, never the dense products: ``<B_i A_i, B_j A_j>_F = sum((B_i^T B_j) * (A_i A_j^T))``."""
        gram = torch.zeros(len(self), len(self), dtype=torch.float64)
        for unit in self.units:
            for name in self.slices:
                pairs = [pair[name] for pair in unit.pairs]
                ups = [pair.up.double() for pair in pairs]
                downs = [pair.down.double() for pair in pairs]
                norms = [float(pair.norm_product()) or 1.0 for pair in pairs]  # a zero pair is a zero direction
                for i in range(len(pairs)):
                    for j in range(i + 1):
                        inner = ((ups[i].T @ ups[j]) * (downs[i] @ downs[j].T)).sum().item() / (norms[i] * norms[j])
                        gram[i, j] += inner
                        if i != j:
                            gram[j, i] += inner
        return gram

    def delta_weights(self) -> list[torch.Tensor]:
        """Per block, the dense ``[3 dim, dim]`` qkv weight change of all pairs (magnitudes and norms applied):
        what the hook adds, written as a weight."""
        return [unit.delta_weight(self.magnitudes, self.normalised) for unit in self.units]

    def merge_into(self, vit: nn.Module) -> None:
        """Add the deltas to a stock ViT's ``qkv`` weights (a copy for deployment, without this set's hooks):
        it then computes what the hooked ViT computes, with no low-rank products at run time."""
        with torch.no_grad():
            for block, delta in zip(_blocks(vit), self.delta_weights()):
                linear = _qkv_linear(block)
                linear.weight += delta.to(linear.weight)

    # --- recording inputs ----------------------------------------------------------------------

    @contextmanager
    def record_inputs(self) -> Iterator[None]:
        """Within: every forward adds ``x^T x`` of each block's qkv input ``x`` (all tokens) to that block's sum."""
        for unit in self.units:
            unit.recording, unit.input_moment, unit.input_tokens = True, None, 0
        try:
            yield
        finally:
            for unit in self.units:
                unit.recording = False

    def input_matrices(self) -> list[torch.Tensor]:
        """Per block, the mean over recorded tokens of ``x^T x`` (``[dim, dim]``, float32, on the CPU)."""
        if any(unit.input_moment is None for unit in self.units):
            raise ValueError("no inputs recorded: run forwards inside `record_inputs()` first")
        return [(unit.input_moment / unit.input_tokens).cpu() for unit in self.units]

    # --- state -------------------------------------------------------------------------------

    def get_extra_state(self) -> dict:
        return {"normalised": list(self.normalised)}

    def set_extra_state(self, state: dict) -> None:
        self.normalised = list(state["normalised"])

    def _grow_to_saved(self, module, state_dict, prefix, *args) -> None:
        """Before loading: as many pairs as the state holds, each with its saved rank."""
        while f"{prefix}magnitudes.{len(self)}" in state_dict:
            down = state_dict[f"{prefix}units.0.pairs.{len(self)}.{self.slices[0]}.down"]
            self.add_pair(down.shape[0])


def fit_last_direction(gram: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Least squares of the last vector on the others, from their Gram matrix ``G`` (e.g. ``direction_gram``):
    ``c = argmin ||d_last - sum_k c_k d_k||`` (the minimum-norm solution where the others are dependent) and that
    residual's norm, ``sqrt(G_ll - 2 c.b + c^T G_p c)`` with ``b = G_p,l``."""
    others, target = gram[:-1, :-1], gram[:-1, -1]
    coefficients = torch.linalg.pinv(others, hermitian=True) @ target
    squared = gram[-1, -1] - 2 * coefficients @ target + coefficients @ others @ coefficients
    return coefficients, float(squared.clamp(min=0).sqrt())


def _qkv_linear(block: nn.Module) -> nn.Linear:
    linear = getattr(getattr(block, "attn", None), "qkv", None)
    if not isinstance(linear, nn.Linear) or linear.out_features != 3 * linear.in_features:
        raise ValueError(f"LoRA needs a fused `attn.qkv` Linear (dim -> 3 dim) in every {type(block).__name__}; "
                         "use timm's standard ViT Block")
    return linear


def attach_lora(vit: nn.Module, slices: Sequence[str] = ("q", "v")) -> LoRASet:
    """A set of LoRA pairs on ``slices`` of every block's qkv projection of ``vit`` (empty until ``add_pair``)."""
    if not slices or len(set(slices)) != len(slices) or any(name not in QKV_SLICES for name in slices):
        raise ValueError(f"LoRA slices must be distinct names among {QKV_SLICES}, got {list(slices)}")
    return LoRASet(vit, slices)
