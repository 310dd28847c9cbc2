"""DAP's prompt generation (Jung et al., ICCV 2023, naver-ai/dap-cl ``src/models/vit_dap/vit.py``): before
every block of a frozen ViT, prompts are generated from the tokens entering that block, per image.

For block ``j`` with input tokens ``x`` [B, T, D] (class and patch tokens, T = 197 for ViT-B/16 at 224):

    down  = W_j  LayerNorm_j(x)^T + b_j                 # [B, D, L]: a linear map over the T tokens
    gamma, beta = split(F_j e)                          # F_j: Linear(E, 2D) of the task embedding e [B, E]
    prompts = (gamma / ||gamma|| * down + beta / ||beta||)^T     # [B, L, D], norms not differentiated

and the L prompts go right after the class token; the next block drops them before generating its own.
The task embedding ``e`` is row ``k`` of a learnt table, ``k`` the key of a pool chosen for the image:
the key whose cosine with the frozen ViT's [CLS] feature is highest (per image), or the task being
trained. Initialisation as the official code: the down-projections W_j, b_j at zero, keys
U(-v, v) with v = sqrt(6 / (3 p^2 + D)) for patch size p, the embedding N(0, 1), FiLM and norms as
PyTorch's defaults.

``GeneratedPrompts`` attaches the generation to timm's stock ``VisionTransformer`` with one forward
pre-hook per block; outside ``use`` the ViT computes exactly what the stock model computes.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pilot.modules.prompting import majority_entries


class PromptGenerator(nn.Module):
    """Per block, prompts generated from the block's input tokens, modulated by a task embedding (DAP).

    ``num_tokens``: tokens a block's input holds without prompts (class + patches); ``length``: prompts
    generated per block; ``pool_size``: keys, and rows of the task-embedding table; ``embedding_dim``: E.
    """

    def __init__(self, num_blocks: int, num_tokens: int, embed_dim: int, length: int = 10, pool_size: int = 10,
                 embedding_dim: int = 16, patch_size: int = 16) -> None:
        super().__init__()
        self.length = length
        self.downsample = nn.ModuleList(nn.Linear(num_tokens, length) for _ in range(num_blocks))
        for layer in self.downsample:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.film = nn.ModuleList(nn.Linear(embedding_dim, 2 * embed_dim) for _ in range(num_blocks))
        self.norm = nn.ModuleList(nn.LayerNorm(embed_dim, eps=1e-6) for _ in range(num_blocks))
        bound = math.sqrt(6.0 / (3 * patch_size ** 2 + embed_dim))
        self.keys = nn.Parameter(torch.empty(pool_size, embed_dim).uniform_(-bound, bound))
        self.task_embedding = nn.Embedding(pool_size, embedding_dim)

    @property
    def pool_size(self) -> int:
        return self.keys.shape[0]

    def similarity(self, query: torch.Tensor) -> torch.Tensor:
        """cosine(query, key) [B, pool_size] for ``query`` [B, D]."""
        return F.normalize(query, dim=-1) @ F.normalize(self.keys, dim=-1).T

    def choose(self, similarity: torch.Tensor, force_index: Optional[int] = None, batchwise: bool = False) -> torch.Tensor:
        """The key of each image [B]: ``force_index`` (the task being trained), else the best-matching key,
        or with ``batchwise`` the key chosen most often in the batch for every image (DAP's test-time vote)."""
        batch = similarity.shape[0]
        if force_index is not None:
            if not 0 <= force_index < self.pool_size:
                raise ValueError(f"force_index must lie in 0..{self.pool_size - 1}, got {force_index}")
            return torch.full((batch,), force_index, dtype=torch.long, device=similarity.device)
        chosen = similarity.argmax(dim=1)
        if batchwise:
            chosen = majority_entries(chosen.unsqueeze(1), self.pool_size).reshape(1).expand(batch)
        return chosen

    def generate(self, block: int, tokens: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """Prompts [B, L, D] of ``block`` from its input ``tokens`` [B, T, D] and task ``embedding`` [B, E]."""
        down = self.downsample[block](self.norm[block](tokens).transpose(1, 2))  # [B, D, L]
        gamma, beta = self.film[block](embedding).chunk(2, dim=-1)
        gamma = gamma / gamma.norm(dim=1, keepdim=True).detach()
        beta = beta / beta.norm(dim=1, keepdim=True).detach()
        return (gamma.unsqueeze(-1) * down + beta.unsqueeze(-1)).transpose(1, 2)


class GeneratedPrompts:
    """Handle that runs a ``PromptGenerator`` inside timm's ``VisionTransformer``; holds no parameters.

    >>> handle = GeneratedPrompts(vit)
    >>> with handle.use(generator, generator.task_embedding(keys)):
    ...     features = vit.forward_features(images)   # [B, prefix + L + patches, D]

    Block ``j``'s forward pre-hook removes the L prompts the block before inserted (right after the class
    and register tokens), generates its own from what is left, and inserts them there.
    """

    def __init__(self, vit: nn.Module) -> None:
        if not isinstance(vit, VisionTransformer):
            raise ValueError(f"generated prompts attach to a timm VisionTransformer, got {type(vit).__name__}")
        self.vit = vit
        self.prefix_tokens = getattr(vit, "num_prefix_tokens", 1)
        self._generator: Optional[PromptGenerator] = None
        self._embedding: Optional[torch.Tensor] = None
        self._hooks = [block.register_forward_pre_hook(self._hook(j)) for j, block in enumerate(vit.blocks)]

    @property
    def num_tokens(self) -> int:
        """Tokens a block's input holds without prompts: the class (and register) tokens and the patches."""
        return self.prefix_tokens + self.vit.patch_embed.num_patches

    @contextmanager
    def use(self, generator: PromptGenerator, embedding: torch.Tensor) -> Iterator[None]:
        """Generate prompts in every forward pass inside the block, from ``embedding`` [B, E]."""
        if len(generator.downsample) != len(self.vit.blocks):
            raise ValueError(f"the generator has {len(generator.downsample)} blocks, the ViT {len(self.vit.blocks)}")
        previous = self._generator, self._embedding
        self._generator, self._embedding = generator, embedding
        try:
            yield
        finally:
            self._generator, self._embedding = previous

    def remove(self) -> None:
        """Give the ViT back its stock forward passes."""
        for hook in self._hooks:
            hook.remove()

    def _hook(self, block: int):
        def insert_prompts(module: nn.Module, args: tuple) -> Optional[tuple]:
            generator = self._generator
            if generator is None:
                return None
            x, split = args[0], self.prefix_tokens
            if block > 0:  # drop the previous block's prompts
                x = torch.cat([x[:, :split], x[:, split + generator.length:]], dim=1)
            if x.shape[1] != generator.downsample[block].in_features:
                raise ValueError(f"block {block} gets {x.shape[1]} tokens, the generator expects "
                                 f"{generator.downsample[block].in_features}")
            prompts = generator.generate(block, x, self._embedding).to(x.dtype)
            return (torch.cat([x[:, :split], prompts, x[:, split:]], dim=1), *args[1:])

        return insert_prompts
