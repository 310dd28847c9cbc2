"""Mixture-of-experts adapters (MoE-Adapters, Yu et al., CVPR 2024) attached to open_clip's stock transformer
blocks by hooks, as ``adapters.py`` attaches AdaptFormer adapters to timm's ViT.

Per block (the official ``cil/clip/model.py ResidualAttentionBlock``): a router ``W_g`` and a noise weight
``W_n`` (``d × experts``, zero-initialised) read the block's first token after attention (``x[:, 0]``: the
image's [CLS], the text's start token), and the block returns ``x + mlp(ln_2(x)) + Σ_i g_i · adapter_i(x)``,
each expert an AdaptFormer adapter (``adaptmlp``: down, ReLU, dropout, up, times the scale; "lora" init) on
the residual stream ``x`` after attention. Gates are noisy top-k (Shazeer et al. 2017, the code's
``noisy_top_k_gating``)::

    h = x W_g (+ ε ⊙ (softplus(x W_n) + 0.01), ε ~ N(0, I), when noisy)
    g = softmax over the top-k entries of h, 0 elsewhere

The official gating has no load-balancing term in the class-incremental loss, so none is computed here.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from pilot.modules.adapters import Adapter, _HookedAdaptation, _Unit

NOISE_EPSILON = 1e-2  # the code's noise_epsilon: the noise's least standard deviation


def noisy_top_k_gates(tokens: torch.Tensor, router: torch.Tensor, noise_weight: torch.Tensor, top_k: int,
                      noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gates ``[B, experts]`` of ``tokens`` ``[B, d]``; ``noise`` (standard normal draws ``[B, experts]``, None =
    no noise) is scaled by ``softplus(tokens W_n) + 0.01`` and added to the router's logits."""
    logits = tokens @ router
    if noise is not None:
        logits = logits + noise * (F.softplus(tokens @ noise_weight) + NOISE_EPSILON)
    top_logits, top_indices = logits.topk(min(top_k, logits.shape[1]), dim=1)
    return torch.zeros_like(logits).scatter(1, top_indices, top_logits.softmax(dim=1))


class MoEAdapter(_Unit):
    """One block's router, noise weight and expert adapters; ``noisy`` draws gate noise (training)."""

    def __init__(self, dim: int, experts: int, top_k: int, bottleneck: int, scale: float, dropout: float,
                 batch_first: bool) -> None:
        super().__init__()
        self.router = nn.Parameter(torch.zeros(dim, experts))
        self.noise_weight = nn.Parameter(torch.zeros(dim, experts))
        self.experts = nn.ModuleList(Adapter(dim, bottleneck, scale, dropout) for _ in range(experts))
        self.top_k = top_k
        self.batch_first = batch_first  # the layout of the transformer's tokens: [B, L, D], else [L, B, D]
        self.noisy = False
        self._residual: Optional[torch.Tensor] = None

    def gates(self, tokens: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(tokens @ self.router) if self.noisy else None
        return noisy_top_k_gates(tokens, self.router, self.noise_weight, self.top_k, noise)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``Σ_i g_i · adapter_i(x)`` for a block's residual stream ``x`` (every expert on every sample; an
        expert outside a sample's top k adds 0, as the code's dispatcher, which skips it)."""
        gates = self.gates(x[:, 0] if self.batch_first else x[0])
        view = (slice(None), None) if self.batch_first else (None, slice(None))
        return sum(gates[(*view, i)][..., None] * expert(x) for i, expert in enumerate(self.experts))

    def remember_residual(self, ln_2: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        """Forward pre-hook on ``block.ln_2``: its input is the residual stream after attention."""
        self._residual = args[0] if self.active else None

    def add_to_block_output(self, block: nn.Module, args: tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
        residual, self._residual = self._residual, None
        if residual is None:
            return None
        return output + self(residual)


class MoEAdapterSet(_HookedAdaptation):
    """A ``MoEAdapter`` on every block of the given open_clip ``Transformer``s (e.g. CLIP's image and text
    towers), off until switched on (``with moe.switched_on():``), so the stock CLIP is what others see."""

    def __init__(self, transformers: list[nn.Module], experts: int = 2, top_k: int = 2, bottleneck: int = 64,
                 scale: float = 0.1, dropout: float = 0.1) -> None:
        if not 1 <= top_k <= experts:
            raise ValueError(f"top_k must be between 1 and the number of experts ({experts}), got {top_k}")
        if bottleneck < 1:
            raise ValueError(f"adapter bottleneck must be a positive width, got {bottleneck}")
        sites = [(block, transformer.width, getattr(transformer, "batch_first", True))
                 for transformer in transformers for block in _resblocks(transformer)]
        super().__init__(nn.ModuleList(MoEAdapter(dim, experts, top_k, bottleneck, scale, dropout, batch_first)
                                       for _, dim, batch_first in sites))
        for (block, _, _), unit in zip(sites, self.units):
            self._handles.append(block.ln_2.register_forward_pre_hook(unit.remember_residual))
            self._handles.append(block.register_forward_hook(unit.add_to_block_output))
        self.enabled = False

    @property
    def noisy(self) -> bool:
        return all(unit.noisy for unit in self.units)

    @noisy.setter
    def noisy(self, value: bool) -> None:
        for unit in self.units:
            unit.noisy = value

    @contextmanager
    def switched_on(self) -> Iterator[None]:
        previous = self.enabled
        self.enabled = True
        try:
            yield
        finally:
            self.enabled = previous


def _resblocks(transformer: nn.Module) -> nn.Module:
    blocks = getattr(transformer, "resblocks", None)
    if blocks is None or not len(blocks) or not all(isinstance(getattr(b, "ln_2", None), nn.Module) for b in blocks):
        raise ValueError(f"{type(transformer).__name__} has no `resblocks` with `ln_2`; MoE adapters need open_clip's "
                         f"stock Transformer")
    return blocks
