"""Prompt insertion into timm's stock VisionTransformer, and the prompt modules of L2P, DualPrompt, CODA-Prompt.

Two ways a prompt reaches the ViT, both driven by one handle, ``PromptedViT``:

* **prompt tuning** (L2P): tokens ``[B, L, D]`` spliced into the embedded sequence right after the class
  (and register) tokens, so ``forward_features`` sees ``[cls, prompts, patches]``; read their outputs
  with ``features[:, handle.prompt_slice(L)]`` (timm's ``global_pool='avg'`` would average them in with
  the patch tokens; ``'token'`` pooling is unaffected);
* **prefix tuning** (DualPrompt, CODA-Prompt): per block, key and value prefixes ``[B, Lp, D]`` each,
  concatenated in front of the block's own keys and values (queries stay the tokens').

Prompts are set per batch, per sample: ``with handle.use(prompt_tokens=..., prefixes={block: (k, v)}):``.
Outside ``use`` the ViT computes exactly what the stock model computes.

How the handle reaches into the ViT, and why:

* the tokens go in through a forward pre-hook on ``vit.norm_pre`` (timm >= 0.9 calls it right after
  ``_pos_embed`` and ``patch_drop``): prompts get no positional embedding and pass through
  ``norm_pre`` like the patch tokens (it is ``Identity`` in the stock ViT);
* prefixes go in by giving each block's ``attn`` instance its own ``forward`` attribute, which calls the
  class's forward unchanged when the block has no prefix, and otherwise ``prefix_attention`` with the
  module's own ``qkv``/``q_norm``/``k_norm``/``norm``/``proj``. Nothing is wrapped or re-registered, so
  ``vit.state_dict()`` keeps timm's keys (pretrained weights load as usual), the handle holds no
  parameters, and ``detach()`` deletes the attribute to give back the untouched stock module.
  A hook cannot replace the attention computation, which is why this is a patch and not a hook;
* ``copy.deepcopy`` of an object holding both the ViT and its handle gives an independent working copy
  (the patched forwards and the hook are bound to the handle, which the copy duplicates too).
  Not supported: ``nn.DataParallel`` (per-batch prompts are not scattered) and gradient checkpointing
  (blocks would be re-run during backward, outside ``use``); use DDP, and ``set_grad_checkpointing(False)``.

Prompt modules own every learnable parameter and return per-sample prompts laid out per layer:
``[B, num_layers, L, D]`` for prompt tuning, ``[B, num_layers, 2, L, D]`` (keys, values) for prefix tuning;
``prefixes_for_blocks`` turns the latter into the ``{block: (key, value)}`` mapping ``use`` takes.
Initialisations follow the official code (L2P/DualPrompt: U(-1, 1) for prompts and keys; CODA-Prompt:
Gram-Schmidt orthonormal components for the current task, zeros for tasks not reached yet).
"""

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn


Prefix = tuple[torch.Tensor, torch.Tensor]
"""Key and value prefixes of one block, ``[B, Lp, D]`` each."""

_IDENTITY = nn.Identity()
_INITS = ("uniform", "zero")


# ---------------------------------------------------------------------------------------------
# Insertion into the ViT
# ---------------------------------------------------------------------------------------------


def prefix_attention(attention: nn.Module, x: torch.Tensor, key_prefix: torch.Tensor, value_prefix: torch.Tensor,
                     attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                     compensated: bool = False) -> torch.Tensor:
    """Self-attention of timm's ``Attention`` module on ``x`` with prefixes added to its keys and values.

    Uses the module's own submodules, so it matches the module's forward when the prefixes are empty.
    Prefixes are already keys/values: they skip ``qkv`` and ``k_norm``. ``compensated`` (LAE's
    compensatory prefix) renormalises the prefix's softmax weights to sum to one: (1 - lambda) *
    attention over the tokens + attention over the prefix alone, lambda being the softmax mass the
    prefix takes from each query.
    """
    if attn_mask is not None or is_causal:
        raise NotImplementedError("an attention mask with prefixes would need padding for the prefix positions; "
                                  "run prefixed blocks without attn_mask / is_causal")
    batch, length, _ = x.shape
    heads, head_dim = attention.num_heads, _head_dim(attention)
    _check_prefix(key_prefix, value_prefix, batch, heads * head_dim)
    q, k, v = attention.qkv(x).reshape(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = getattr(attention, "q_norm", _IDENTITY)(q), getattr(attention, "k_norm", _IDENTITY)(k)
    key_prefix, value_prefix = (_split_heads(prefix, heads).to(q.dtype) for prefix in (key_prefix, value_prefix))
    if compensated:
        out = _compensated_attention(attention, q, k, v, key_prefix, value_prefix)
    else:
        dropout = attention.attn_drop.p if attention.training else 0.0
        out = F.scaled_dot_product_attention(q, torch.cat([key_prefix, k], dim=2), torch.cat([value_prefix, v], dim=2),
                                             dropout_p=dropout, scale=getattr(attention, "scale", None))
    out = getattr(attention, "norm", _IDENTITY)(out.transpose(1, 2).reshape(batch, length, heads * head_dim))
    gate = getattr(attention, "gate", None)  # gated attention of recent timm releases
    if gate is not None:
        out = out * gate(x).sigmoid()
    return attention.proj_drop(attention.proj(out))


def _compensated_attention(attention: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           key_prefix: torch.Tensor, value_prefix: torch.Tensor) -> torch.Tensor:
    """Explicit softmax over [prefix, tokens], then the prefix's weights divided by their sum."""
    weights = (q @ torch.cat([key_prefix, k], dim=2).transpose(-2, -1) * attention.scale).softmax(dim=-1)
    weights = attention.attn_drop(weights)
    prefix_weights, token_weights = weights.split([key_prefix.shape[2], k.shape[2]], dim=-1)
    prefix_weights = prefix_weights / prefix_weights.sum(dim=-1, keepdim=True).clamp(min=1e-12)
    return prefix_weights @ value_prefix + token_weights @ v


class PromptedViT:
    """Handle that inserts per-sample prompts into a timm ``VisionTransformer``; holds no parameters.

    >>> handle = PromptedViT(vit)
    >>> with handle.use(prompt_tokens=tokens):            # L2P: tokens [B, L, D]
    ...     features = vit.forward_features(images)
    >>> prompt_outputs = features[:, handle.prompt_slice(tokens.shape[1])]
    >>> with handle.use(prefixes={2: (keys, values)}):    # DualPrompt / CODA: [B, Lp, D] each
    ...     features = vit.forward_features(images)
    """

    def __init__(self, vit: nn.Module, compensated: bool = False) -> None:
        """``compensated``: prefixed blocks use LAE's compensatory attention (see ``prefix_attention``)."""
        _check_vit(vit)
        self.vit = vit
        self.compensated = compensated
        self._prompt_tokens: torch.Tensor | None = None
        self._prefixes: Mapping[int, Prefix] = {}
        self._hook = vit.norm_pre.register_forward_pre_hook(self._insert_prompt_tokens)
        for layer, block in enumerate(vit.blocks):
            block.attn.forward = partial(self._attend, block.attn, layer)

    @property
    def num_prefix_tokens(self) -> int:
        """Class and register tokens in front of the prompt tokens."""
        return getattr(self.vit, "num_prefix_tokens", 1)

    def class_position(self) -> torch.Tensor:
        """The [CLS] token's position embedding [1, 1, D] (zeros where the ViT gives its class token none):
        what the official L2P code adds to every prompt token (its ``resize_pos_embed``)."""
        vit = self.vit
        if getattr(vit, "no_embed_class", False) or not getattr(vit, "has_class_token", True):
            return torch.zeros(1, 1, vit.embed_dim, device=vit.pos_embed.device, dtype=vit.pos_embed.dtype)
        return vit.pos_embed[:, :1]

    def prompt_slice(self, length: int) -> slice:
        """Positions of ``length`` prompt tokens in the output of ``forward_features`` (1..1+L for a stock ViT)."""
        return slice(self.num_prefix_tokens, self.num_prefix_tokens + length)

    @contextmanager
    def use(self, prompt_tokens: torch.Tensor | None = None,
            prefixes: Mapping[int, Prefix] | None = None) -> Iterator[None]:
        """Prompt every forward pass inside the block: tokens ``[B, L, D]``, prefixes ``{block: ([B, Lp, D]) * 2}``.

        Sample ``i`` of the batch uses row ``i`` of each tensor; empty prompts (``L = 0``) change nothing.
        """
        prefixes = dict(prefixes or {})
        if getattr(self.vit, "grad_checkpointing", False):
            raise ValueError("prompts cannot be used with gradient checkpointing, which re-runs blocks outside "
                             "`use` during backward; call vit.set_grad_checkpointing(False)")
        unknown = sorted(set(prefixes) - set(range(len(self.vit.blocks))))
        if unknown:
            raise ValueError(f"prefixes given for blocks {unknown}, "
                             f"but the ViT has blocks 0..{len(self.vit.blocks) - 1}")
        previous = self._prompt_tokens, self._prefixes
        self._prompt_tokens, self._prefixes = prompt_tokens, prefixes
        try:
            yield
        finally:
            self._prompt_tokens, self._prefixes = previous

    def detach(self) -> None:
        """Give the ViT back its stock forward passes; the handle is unusable afterwards."""
        self._hook.remove()
        for block in self.vit.blocks:
            if isinstance(vars(block.attn).get("forward"), partial):
                del block.attn.forward

    def _insert_prompt_tokens(self, norm_pre: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple | None:
        tokens = self._prompt_tokens
        if tokens is None:
            return None
        x = args[0]
        if tokens.dim() != 3 or tokens.shape[0] != x.shape[0] or tokens.shape[2] != x.shape[2]:
            raise ValueError(f"prompt tokens must be [batch={x.shape[0]}, length, dim={x.shape[2]}], "
                             f"got {list(tokens.shape)}")
        split = self.num_prefix_tokens
        return (torch.cat([x[:, :split], tokens.to(x.dtype), x[:, split:]], dim=1), *args[1:])

    def _attend(self, attention: nn.Module, layer: int, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        prefix = self._prefixes.get(layer)
        if prefix is None or prefix[0].shape[1] == 0:
            return type(attention).forward(attention, x, *args, **kwargs)
        return prefix_attention(attention, x, *prefix, *args, compensated=self.compensated, **kwargs)


def prefixes_for_blocks(prompts: torch.Tensor, blocks: Sequence[int]) -> dict[int, Prefix]:
    """Map layer ``j`` of prefix prompts ``[B, num_layers, 2, L, D]`` to ViT block ``blocks[j]``."""
    if prompts.dim() != 5 or prompts.shape[2] != 2:
        raise ValueError(f"prefix prompts must be [batch, layers, 2, length, dim], got {list(prompts.shape)}")
    if prompts.shape[1] != len(blocks):
        raise ValueError(f"{prompts.shape[1]} prompt layers cannot go to the {len(blocks)} blocks {list(blocks)}")
    return {block: (prompts[:, j, 0], prompts[:, j, 1]) for j, block in enumerate(blocks)}


def _check_vit(vit: nn.Module) -> None:
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"prompts attach to a timm VisionTransformer (e.g. timm.create_model('vit_base_patch16_224')),"
                         f" got {type(vit).__name__}")
    if not isinstance(getattr(vit, "norm_pre", None), nn.Module):
        raise ValueError("the ViT has no `norm_pre`; prompt tuning needs timm >= 0.9")
    for layer, block in enumerate(vit.blocks):
        attention = getattr(block, "attn", None)
        if not isinstance(getattr(attention, "qkv", None), nn.Linear) or not hasattr(attention, "num_heads"):
            raise ValueError(f"blocks[{layer}].attn is not timm's Attention (no `qkv` Linear / `num_heads`); "
                             "prefix tuning needs timm's standard ViT blocks")
        if "forward" in vars(attention):
            raise ValueError(f"blocks[{layer}].attn already has a patched forward (prompts attached twice?); "
                             "call detach() on the existing PromptedViT first")


def _head_dim(attention: nn.Module) -> int:
    return getattr(attention, "head_dim", None) or attention.qkv.out_features // (3 * attention.num_heads)


def _check_prefix(key_prefix: torch.Tensor, value_prefix: torch.Tensor, batch: int, width: int) -> None:
    for name, prefix in (("key", key_prefix), ("value", value_prefix)):
        if prefix.dim() != 3 or prefix.shape[0] != batch or prefix.shape[2] != width:
            raise ValueError(f"{name} prefix must be [batch={batch}, length, dim={width}], got {list(prefix.shape)}")
    if key_prefix.shape[1] != value_prefix.shape[1]:
        raise ValueError(f"key and value prefixes differ in length: {key_prefix.shape[1]} vs {value_prefix.shape[1]}")


def _split_heads(prefix: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, Lp, H * hd] -> [B, H, Lp, hd], the layout of timm's keys and values."""
    return prefix.unflatten(-1, (heads, -1)).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# L2P / DualPrompt: key-query prompt pool and the shared G-prompt
# ---------------------------------------------------------------------------------------------


@dataclass
class PoolSelection:
    """What ``PromptPool.select`` picked for each sample."""

    indices: torch.Tensor  # [B, top_k] pool entries used
    similarity: torch.Tensor  # [B, pool_size] cosine(query, key) of every key
    selected_similarity: torch.Tensor  # [B, top_k] cosine(query, key) of the used keys (for ``pull_loss``)
    prompts: torch.Tensor  # [B, num_layers, top_k * L, D], or [B, num_layers, 2, top_k * L, D] for prefixes


class PromptPool(nn.Module):
    """Pool of prompts with learnable keys, chosen per sample by cosine similarity to a query (L2P, DualPrompt).

    Parameters: ``keys`` [pool_size, D]; ``prompts`` [pool_size, num_layers, L, D], or with ``prefix=True``
    [pool_size, num_layers, 2, L, D] (separate key and value prefixes of length L). Official settings:
    L2P pool 10, length 5, top-5, one layer of prompt tokens; DualPrompt's E-prompt pool 10, length 5,
    top-1, prefixes in blocks 2-4. ``'uniform'`` init is U(-1, 1) as in the official code.
    """

    def __init__(self, pool_size: int, length: int, embed_dim: int, top_k: int, num_layers: int = 1,
                 prefix: bool = False, key_init: str = "uniform", prompt_init: str = "uniform") -> None:
        super().__init__()
        if not 1 <= top_k <= pool_size:
            raise ValueError(f"top_k must be between 1 and pool_size={pool_size}, got {top_k}")
        self.top_k = top_k
        self.keys = nn.Parameter(_initial_values((pool_size, embed_dim), key_init))
        shape = (pool_size, num_layers, 2, length, embed_dim) if prefix else (pool_size, num_layers, length, embed_dim)
        self.prompts = nn.Parameter(_initial_values(shape, prompt_init))

    @property
    def pool_size(self) -> int:
        return self.keys.shape[0]

    def select(self, query: torch.Tensor, force_index: torch.Tensor | None = None,
               allowed: torch.Tensor | Sequence[int] | None = None, batchwise: bool = False) -> PoolSelection:
        """Top-k entries per sample by cosine similarity between ``query`` [B, D] and the keys.

        ``force_index`` ([B] or [B, top_k]) picks the entries instead (DualPrompt trains task t's E-prompt),
        overriding ``allowed``, which restricts the top-k search to these pool indices. Each sample gets its
        own entries unless ``batchwise`` (PILOT's and the official ``batchwise_prompt``): then every sample
        gets the ``top_k`` entries chosen most often in the batch (see ``majority_entries``).
        """
        if query.dim() != 2 or query.shape[1] != self.keys.shape[1]:
            raise ValueError(f"query must be [batch, {self.keys.shape[1]}], got {list(query.shape)}")
        similarity = F.normalize(query, dim=-1) @ F.normalize(self.keys, dim=-1).T
        if force_index is None:
            indices = self._top_k(similarity, allowed)
            if batchwise:
                indices = majority_entries(indices, self.pool_size).expand(query.shape[0], -1)
        else:
            indices = self._forced(force_index, query.shape[0])
        prompts = self.prompts[indices].movedim(1, -3).flatten(-3, -2)  # top_k entries joined along the length
        return PoolSelection(indices, similarity, similarity.gather(1, indices), prompts)

    def _top_k(self, similarity: torch.Tensor, allowed: torch.Tensor | Sequence[int] | None) -> torch.Tensor:
        if allowed is not None:
            allowed = torch.as_tensor(allowed, dtype=torch.long, device=similarity.device)
            if allowed.numel() < self.top_k:
                raise ValueError(f"only {allowed.numel()} allowed prompts for top_k={self.top_k}")
            selectable = torch.zeros(self.pool_size, dtype=torch.bool, device=similarity.device)
            selectable[allowed] = True
            similarity = similarity.masked_fill(~selectable, float("-inf"))
        return similarity.topk(self.top_k, dim=1).indices

    def _forced(self, force_index: torch.Tensor, batch: int) -> torch.Tensor:
        indices = torch.as_tensor(force_index, dtype=torch.long, device=self.keys.device)
        if indices.dim() == 1:
            indices = indices.unsqueeze(1)
        if indices.shape != (batch, self.top_k):
            raise ValueError(f"force_index must be [{batch}] or [{batch}, {self.top_k}], got {list(indices.shape)}")
        if indices.min() < 0 or indices.max() >= self.pool_size:
            raise ValueError(f"force_index must lie in 0..{self.pool_size - 1}")
        return indices


def majority_entries(indices: torch.Tensor, pool_size: int) -> torch.Tensor:
    """The ``top_k`` pool entries chosen most often over a batch's per-sample choices ``indices`` [B, top_k].

    The official L2P/DualPrompt code (and PILOT's copy): unique ids with their counts, padded to the pool
    size with count 0, then the top-k counts; ties fall as ``torch.topk`` orders them, as there.
    """
    top_k = indices.shape[1]
    ids, counts = torch.unique(indices, return_counts=True, sorted=True)
    if ids.shape[0] < pool_size:
        padding = pool_size - ids.shape[0]
        ids = torch.cat([ids, torch.full((padding,), int(indices.min()), device=ids.device, dtype=ids.dtype)])
        counts = torch.cat([counts, torch.zeros(padding, device=counts.device, dtype=counts.dtype)])
    _, major = torch.topk(counts, k=top_k)
    return ids[major].unsqueeze(0)


def pull_loss(selected_similarity: torch.Tensor) -> torch.Tensor:
    """L2P's surrogate loss pulling the used keys towards their queries: -(sum of cosines) / batch.

    As in the official code, the cosines of a sample's top-k keys are summed (not averaged); add it to the
    classification loss with weight ``pull_constraint_coeff`` (0.1 in the published configs).
    """
    return -selected_similarity.sum() / selected_similarity.shape[0]


class GeneralPrompt(nn.Module):
    """Prompt shared by every sample, no key (DualPrompt's G-prompt: length 5, prefixes in blocks 0-1).

    ``prompts`` is [num_layers, 2, L, D] with ``prefix=True``, else [num_layers, L, D]; U(-1, 1) init.
    """

    def __init__(self, length: int, embed_dim: int, num_layers: int = 1, prefix: bool = True,
                 init: str = "uniform") -> None:
        super().__init__()
        shape = (num_layers, 2, length, embed_dim) if prefix else (num_layers, length, embed_dim)
        self.prompts = nn.Parameter(_initial_values(shape, init))

    def forward(self, batch_size: int) -> torch.Tensor:
        """The prompts repeated for each sample (a view): [B, num_layers, (2,) L, D]."""
        return self.prompts.expand(batch_size, *self.prompts.shape)


class PrefixPET(nn.Module):
    """LAE's Prefix PET: per block, key and value prefixes of ``length`` tokens, U(0, 0.01), each scaled by a
    learnable scalar (init 1). ``forward(batch)`` gives [B, blocks, 2, length, D] for ``prefixes_for_blocks``."""

    def __init__(self, length: int, embed_dim: int, num_blocks: int):
        super().__init__()
        self.tokens = GeneralPrompt(length, embed_dim, num_blocks, prefix=True, init="zero")
        nn.init.uniform_(self.tokens.prompts, 0.0, 0.01)
        self.scales = nn.Parameter(torch.ones(num_blocks, 2, 1, 1))

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.tokens(batch_size) * self.scales


def _initial_values(shape: tuple[int, ...], init: str) -> torch.Tensor:
    if init not in _INITS:
        raise ValueError(f"prompt/key init must be one of {_INITS}, got {init!r}")
    values = torch.zeros(shape)
    return nn.init.uniform_(values, -1.0, 1.0) if init == "uniform" else values


# ---------------------------------------------------------------------------------------------
# CODA-Prompt: attention-weighted sum of prompt components
# ---------------------------------------------------------------------------------------------


class CodaPrompt(nn.Module):
    """CODA-Prompt's decomposed prompts: per layer, components P [C, L, D], keys K [C, D], attention A [C, D].

    For a query q (the frozen ViT's class token), ``alpha_c = cos(q * A_c, K_c)`` and the prompt is
    ``sum_c alpha_c P_c``; its first L/2 tokens are the key prefix, the last L/2 the value prefix.
    Components come in ``num_tasks`` slices of ``num_components // num_tasks`` (leftovers unused, as in
    the official code). At task t the slices 0..t are used and only slice t trains: each slice is its own
    parameter (``components.t``, ``keys.t``, ``attention.t``) and earlier ones get ``requires_grad=False``,
    so an optimiser built on ``filter(lambda p: p.requires_grad, ...)`` cannot move them, weight decay
    included. Slice t starts orthonormal (Gram-Schmidt, orthogonal to every earlier component) when the
    task is reached; slices of later tasks stay zero until then. Official settings: 100 components,
    length 8, blocks 0-4, ortho_mu 0.
    """

    def __init__(self, embed_dim: int, num_tasks: int, num_components: int = 100, length: int = 8,
                 num_layers: int = 5) -> None:
        super().__init__()
        per_task = num_components // num_tasks
        if per_task < 1:
            raise ValueError(f"num_components={num_components} gives no component to each of {num_tasks} tasks")
        if length % 2:
            raise ValueError(f"CODA-Prompt length must be even (half keys, half values), got {length}")
        if per_task * num_tasks > embed_dim:
            raise ValueError(f"{per_task * num_tasks} components cannot be mutually orthogonal in dim {embed_dim}; "
                             "use num_components <= embed_dim")
        self.num_tasks = num_tasks
        self.components = _zero_slices(num_tasks, (num_layers, per_task, length, embed_dim))
        self.keys = _zero_slices(num_tasks, (num_layers, per_task, embed_dim))
        self.attention = _zero_slices(num_tasks, (num_layers, per_task, embed_dim))
        self.register_buffer("current_task", torch.tensor(0))
        self._init_slice(0)
        self._freeze_other_slices()
        self.register_load_state_dict_post_hook(_freeze_after_load)

    @property
    def task(self) -> int:
        return int(self.current_task)

    def set_task(self, task: int) -> None:
        """Move on to ``task`` (official ``process_task_count`` = ``set_task(task + 1)``), initialising new slices."""
        if not self.task <= task < self.num_tasks:
            raise ValueError(f"CODA-Prompt can move from task {self.task} to a task in {self.task}.."
                             f"{self.num_tasks - 1}, not {task}")
        for new_task in range(self.task + 1, task + 1):
            self._init_slice(new_task)
        self.current_task.fill_(task)
        self._freeze_other_slices()

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        """Prefix prompts [B, num_layers, 2, L/2, D] for ``query`` [B, D], from the slices of tasks 0..task."""
        components, keys, attention = self._active()
        attended_query = F.normalize(query[:, None, None, :] * attention, dim=-1)  # [B, layers, C, D]
        weights = (attended_query * F.normalize(keys, dim=-1)).sum(-1)  # [B, layers, C]
        prompts = torch.einsum("bnc,ncld->bnld", weights, components)
        return prompts.unflatten(2, (2, -1))

    def orthogonality_loss(self) -> torch.Tensor:
        """CODA's regulariser summed over layers for K, A and flattened P; weight it by ``ortho_mu``."""
        components, keys, attention = self._active()
        return sum(orthogonality_penalty(rows[layer].flatten(1))
                   for rows in (keys, attention, components) for layer in range(rows.shape[0]))

    def _active(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        used = slice(0, self.task + 1)
        return tuple(torch.cat(list(slices[used]), dim=1) for slices in (self.components, self.keys, self.attention))

    def _freeze_other_slices(self) -> None:
        for slices in (self.components, self.keys, self.attention):
            for task, parameter in enumerate(slices):
                parameter.requires_grad_(task == self.task)

    @torch.no_grad()
    def _init_slice(self, task: int) -> None:
        per_task = self.keys[0].shape[1]
        for slices in (self.components, self.keys, self.attention):
            for layer, new_slice in enumerate(slices[task]):
                # rows of tasks 0..task-1 ([0, n] for task 0, which a cat of no tensors cannot give)
                earlier = torch.cat([slices[t][layer] for t in range(task + 1)]).flatten(1)[:task * per_task]
                new_slice.copy_(orthonormal_rows_after(earlier, per_task).view_as(new_slice))


def _zero_slices(num_tasks: int, shape: tuple[int, ...]) -> nn.ParameterList:
    return nn.ParameterList(nn.Parameter(torch.zeros(shape)) for _ in range(num_tasks))


def _freeze_after_load(coda: CodaPrompt, incompatible_keys: object) -> None:
    """The loaded ``current_task`` decides which slice trains."""
    coda._freeze_other_slices()


def orthonormal_rows_after(earlier: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` random unit rows orthogonal to each other and to every row of ``earlier`` [n, d].

    Gram-Schmidt of Gaussian vectors against the span of ``earlier`` (done by QR, in float64), as CODA-Prompt
    initialises a new task's components; the span is used so trained, non-orthogonal rows are handled.
    """
    candidates = torch.randn(count, earlier.shape[1], dtype=torch.float64, device=earlier.device)
    basis, _ = torch.linalg.qr(torch.cat([earlier.double(), candidates]).T)
    return basis[:, earlier.shape[0]:].T.to(earlier.dtype)


def orthogonality_penalty(rows: torch.Tensor) -> torch.Tensor:
    """mean((R R^T - I)^2) for rows R [n, d]: zero when the rows are orthonormal."""
    identity = torch.eye(rows.shape[0], device=rows.device, dtype=rows.dtype)
    return ((rows @ rows.T - identity) ** 2).mean()
