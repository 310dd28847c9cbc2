"""Parameter-efficient adaptation (AdaptFormer adapters, SSF, VPT prompt tokens) attached to timm's stock VisionTransformer.

Nothing in the ViT is replaced or subclassed: the adaptation lives in its own ``nn.Module`` (an
``AdapterSet``, ``SSFSet`` or ``VisualPromptSet``) and reaches into the forward pass through hooks. Consequences:

* the ViT's ``state_dict`` keeps timm's keys, so pretrained weights load as usual;
* the set's ``state_dict`` holds only the adaptation parameters (train, save and merge them alone);
* ``enabled = False`` (or ``with adaptation.disabled():``) gives the frozen pretrained features from the
  same weights, as APER needs for concatenating frozen and adapted features;
* the set is not a submodule of the ViT: keep both in one parent module so ``.to()`` moves both.
  ``copy.deepcopy`` of such a parent gives an independent working copy, because every hook is a
  bound method of a module inside the set.
"""

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle



def freeze(module: nn.Module) -> None:
    """Stop gradients for every parameter of ``module`` (e.g. the ViT, so only the adaptation trains)."""
    for parameter in module.parameters():
        parameter.requires_grad_(False)


class _HookedAdaptation(nn.Module):
    """Common part of the sets: on/off switch and hook removal."""

    def __init__(self, units: nn.Module) -> None:
        super().__init__()
        self.units = units
        self._handles: list[RemovableHandle] = []
        self._enabled = True

    def _units(self) -> Iterator["_Unit"]:
        return (module for module in self.units.modules() if isinstance(module, _Unit))

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = value
        for unit in self._units():
            unit.active = value

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the stock ViT inside the block, then restore the previous state."""
        previous = self.enabled
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = previous

    def remove(self) -> None:
        """Detach every hook; the ViT is stock again. The parameters stay in this module."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class _Unit(nn.Module):
    """A piece of adaptation that one or more hooks call; ``active`` is set by the owning set."""

    def __init__(self) -> None:
        super().__init__()
        self.active = True


# ---------------------------------------------------------------------------------------------
# AdaptFormer adapter
# ---------------------------------------------------------------------------------------------


class Adapter(_Unit):
    """Bottleneck MLP added in parallel to a block's MLP (AdaptFormer, as PILOT/APER/RanPAC use it).

    ``adapter(x) = scale * up(dropout(relu(down(x))))`` on the block's residual stream ``x`` after
    attention (not on ``norm2(x)``); the block then returns ``x + mlp(norm2(x)) + adapter(x)``.
    PILOT's settings: bottleneck ``ffn_num`` (64 for APER/RanPAC), ``ffn_adapter_scalar=0.1``,
    no adapter layer norm, dropout 0.1, and the "lora" init below (up-projection zero, so the
    adapted ViT starts exactly at the pretrained one).
    """

    def __init__(self, dim: int, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        self._residual: torch.Tensor | None = None
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.dropout(torch.relu(self.down(x))))

    def remember_residual(self, norm2: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        """Forward pre-hook on ``block.norm2``: its input is the residual stream the adapter reads."""
        self._residual = args[0] if self.active else None

    def add_to_block_output(self, block: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """Forward hook on the block: add the adapter branch after the MLP residual."""
        residual, self._residual = self._residual, None
        if residual is None:
            return None
        return output + self(residual)


class AdapterSet(_HookedAdaptation):
    """One ``Adapter`` per ViT block, attached by hooks. Build it with ``attach_adapters``.

    A hook on ``block.mlp`` cannot see the residual stream the official adapter reads, so each
    adapter uses two hooks: a pre-hook on ``block.norm2`` stores its input, and a hook on the block
    adds ``adapter(stored input)`` to the block's output. Adding at the block output (rather than
    to the MLP output) keeps the branch outside timm's ``ls2``/``drop_path2``, as in PILOT's Block.
    """

    def __init__(self, vit: nn.Module, bottleneck: int, scale: float, dropout: float) -> None:
        blocks = _blocks(vit)
        dim = _embed_dim(vit)
        super().__init__(nn.ModuleList(Adapter(dim, bottleneck, scale, dropout) for _ in blocks))
        for block, adapter in zip(blocks, self.units):
            _require(block, "norm2", "adapters")
            self._handles.append(block.norm2.register_forward_pre_hook(adapter.remember_residual))
            self._handles.append(block.register_forward_hook(adapter.add_to_block_output))


def attach_adapters(vit: nn.Module, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1) -> AdapterSet:
    """Add a parallel AdaptFormer adapter to every block of ``vit``; returns the module holding them."""
    if bottleneck < 1:
        raise ValueError(f"adapter bottleneck must be a positive width, got {bottleneck}")
    return AdapterSet(vit, bottleneck, scale, dropout)


class AdapterBank(nn.ModuleList):
    """Adapter sets on one ViT, one per task, each frozen for good once its task ends (EASE's subspaces, MOS's
    task adapters), with the feature store of the backbone running it.

    ``new_set()`` gives an idle adapter set on the ViT (on the run's device, off until an encoder switches it
    on); ``open_store(adapters)`` freezes a set and gives its feature store. The state dict is the sets'
    (keys ``<index>.units...``); loading one grows the bank to the sets it holds and closes them all, since
    checkpoints are taken between tasks.
    """

    def __init__(self, new_set: Callable[[], nn.Module], open_store: Callable[[nn.Module], Any]) -> None:
        super().__init__()
        self.new_set = new_set
        self.open_store = open_store
        self.stores: list[Any] = []  # of the closed sets, in order
        self.register_load_state_dict_pre_hook(self._grow_to_saved)
        self.register_load_state_dict_post_hook(self._close_loaded)

    def add(self, weights: Optional[dict[str, torch.Tensor]] = None) -> nn.Module:
        """Append a new set, trainable until ``close``; starting from ``weights`` if given."""
        adapters = self.new_set()
        if weights is not None:
            adapters.load_state_dict(weights)
        self.append(adapters)
        return adapters

    def close(self) -> None:
        """Freeze the newest set for good and open its feature store."""
        self.stores.append(self.open_store(self[-1]))

    def _grow_to_saved(self, module, state_dict, prefix, *args) -> None:
        """Before loading: as many sets as the state dict holds, so that each finds its module."""
        saved = {key[len(prefix):].split(".")[0] for key in state_dict if key.startswith(prefix)}
        while len(self) < len(saved):
            self.add()

    def _close_loaded(self, module, incompatible_keys) -> None:
        """After loading: the loaded sets' stores, keyed by their weights."""
        for adapters in list(self)[len(self.stores):]:
            self.stores.append(self.open_store(adapters))


# ---------------------------------------------------------------------------------------------
# SSF: scale and shift features
# ---------------------------------------------------------------------------------------------


class ScaleShift(_Unit):
    """Per-channel ``y * scale + shift`` applied to a submodule's output (SSF).

    Official init: scale ~ N(1, 0.02), shift ~ N(0, 0.02); ``init_std=0`` gives the identity.
    ``channel_dim`` is 1 for the patch-embedding convolution (NCHW), -1 for token features.
    """

    def __init__(self, width: int, init_std: float = 0.02, channel_dim: int = -1) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(width))
        self.shift = nn.Parameter(torch.empty(width))
        self.channel_dim = channel_dim
        nn.init.normal_(self.scale, mean=1.0, std=init_std)
        nn.init.normal_(self.shift, mean=0.0, std=init_std)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        shape = [1] * features.dim()
        shape[self.channel_dim] = -1
        return features * self.scale.view(shape) + self.shift.view(shape)

    def adapt_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """Forward hook: replace the submodule's output by its scaled and shifted version."""
        return self(output) if self.active else None


def _ssf_sites(vit: nn.Module) -> list[tuple[str, int]]:
    """(submodule path, channel dim) in PILOT's ``vit_ssf`` order.

    Per block: after norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2. Outside the blocks: after the
    patch projection (before the patch-embed norm), after the patch-embed norm when it exists, and
    after the final ``norm`` (before pooling; official applies it even when that norm is Identity).
    """
    sites = [("patch_embed.proj", 1)]
    if not isinstance(getattr(vit.patch_embed, "norm", nn.Identity()), nn.Identity):
        sites.append(("patch_embed.norm", -1))
    for index in range(len(_blocks(vit))):
        for name in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            sites.append((f"blocks.{index}.{name}", -1))
    sites.append(("norm", -1))
    return sites


def _output_width(module: nn.Module, embed_dim: int) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    if isinstance(module, nn.Identity):
        return embed_dim
    raise ValueError(f"SSF cannot infer the output width of {type(module).__name__}; use a timm VisionTransformer")


class SSFSet(_HookedAdaptation):
    """Scale-and-shift vectors after every SSF site of the ViT. Build it with ``attach_ssf``.

    Parameters are keyed by the submodule path with dots replaced by ``__``
    (e.g. ``units.blocks__0__attn__qkv.scale``).
    """

    def __init__(self, vit: nn.Module, init_std: float) -> None:
        embed_dim = _embed_dim(vit)
        targets: dict[str, tuple[nn.Module, ScaleShift]] = {}
        for path, channel_dim in _ssf_sites(vit):
            module = _submodule(vit, path)
            targets[path] = (module, ScaleShift(_output_width(module, embed_dim), init_std, channel_dim))
        super().__init__(nn.ModuleDict({path.replace(".", "__"): unit for path, (_, unit) in targets.items()}))
        for module, unit in targets.values():
            self._handles.append(module.register_forward_hook(unit.adapt_output))


def attach_ssf(vit: nn.Module, init_std: float = 0.02) -> SSFSet:
    """Add SSF scale/shift at the official sites of ``vit``; returns the module holding them."""
    if init_std < 0:
        raise ValueError(f"SSF init_std must be >= 0, got {init_std}")
    return SSFSet(vit, init_std)


# ---------------------------------------------------------------------------------------------
# VPT: visual prompt tokens
# ---------------------------------------------------------------------------------------------


class PromptTokens(_Unit):
    """One layer of VPT prompt tokens as APER's code has them (``backbone/vpt.py``, and
    zhoudw-zdw/RevisitingCIL): ``length`` zero-initialised tokens, no dropout, no position embedding,
    appended after the patch tokens before a block and dropped from the output of a block.
    """

    def __init__(self, length: int, dim: int) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.zeros(length, dim))

    def append(self, block: nn.Module, args: tuple) -> tuple | None:
        """Forward pre-hook: the block's tokens followed by the prompts."""
        if not self.active:
            return None
        x = args[0]
        return (torch.cat([x, self.tokens.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1), *args[1:])

    def drop(self, block: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """Forward hook: the block's output without the prompt positions."""
        return output[:, : -self.tokens.shape[0]] if self.active else None


class VisualPromptSet(_HookedAdaptation):
    """VPT by hooks. Deep: each block appends its own tokens and drops their outputs, so the next block
    gets fresh ones. Shallow: one set appended before the first block, dropped after the last. The
    final norm and pooling see the stock token layout. Build it with ``attach_visual_prompts``.
    """

    def __init__(self, vit: nn.Module, length: int, deep: bool) -> None:
        blocks = _blocks(vit)
        dim = _embed_dim(vit)
        super().__init__(nn.ModuleList(PromptTokens(length, dim) for _ in (blocks if deep else blocks[:1])))
        spans = [(block, block) for block in blocks] if deep else [(blocks[0], blocks[-1])]
        for (first, last), prompts in zip(spans, self.units):
            self._handles.append(first.register_forward_pre_hook(prompts.append))
            self._handles.append(last.register_forward_hook(prompts.drop))


def attach_visual_prompts(vit: nn.Module, length: int = 5, deep: bool = True) -> VisualPromptSet:
    """Add VPT prompt tokens to ``vit`` (deep: at every block; shallow: at the first); returns their module."""
    if length < 1:
        raise ValueError(f"VPT needs at least one prompt token, got {length}")
    return VisualPromptSet(vit, length, deep)


# ---------------------------------------------------------------------------------------------
# Checks on the ViT's structure
# ---------------------------------------------------------------------------------------------


def _blocks(vit: nn.Module) -> nn.Module:
    blocks = getattr(vit, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise ValueError(f"{type(vit).__name__} has no `blocks`; adaptation needs a timm VisionTransformer")
    return blocks


def _embed_dim(vit: nn.Module) -> int:
    dim = getattr(vit, "embed_dim", None)
    if not isinstance(dim, int):
        raise ValueError(f"{type(vit).__name__} has no integer `embed_dim`; adaptation needs a timm VisionTransformer")
    return dim


def _require(module: nn.Module, name: str, what: str) -> None:
    if not isinstance(getattr(module, name, None), nn.Module):
        raise ValueError(f"{what} need `{name}` in every {type(module).__name__}; use timm's standard ViT Block")


def _submodule(vit: nn.Module, path: str) -> nn.Module:
    try:
        return vit.get_submodule(path)
    except AttributeError:
        raise ValueError(f"SSF needs `{path}` in the ViT, which {type(vit).__name__} lacks; "
                         "use a timm VisionTransformer with standard blocks") from None
