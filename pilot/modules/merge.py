"""Weight-space merging operators: EMA, plain interpolation, diagonal Fisher and Fisher-weighted merging,
EMR-merging.

Learners (LAE's offline PET, CoFiMA's task-wise merge, TUNA's universal adapter) call these on ``state_dict``-like mappings
``name -> tensor``; nothing here knows about tasks or heads.
"""

from collections.abc import Callable, Iterable, Mapping, MutableMapping
from itertools import islice
from typing import Any

import torch
from torch import nn


Weights = Mapping[str, torch.Tensor]


def _float_state(module_or_weights: nn.Module | Weights) -> dict[str, torch.Tensor]:
    """Parameters and floating-point buffers of a module, or the floating-point entries of a mapping."""
    if isinstance(module_or_weights, nn.Module):
        named = list(module_or_weights.named_parameters()) + list(module_or_weights.named_buffers())
    else:
        named = list(module_or_weights.items())
    return {name: tensor for name, tensor in named if torch.is_floating_point(tensor)}


def _check_same_layout(first: Weights, second: Weights, first_name: str, second_name: str) -> None:
    missing = sorted(set(first) - set(second))
    extra = sorted(set(second) - set(first))
    if missing or extra:
        raise ValueError(f"{first_name} and {second_name} hold different tensors: only in {first_name}: "
                         f"{missing[:5]}, only in {second_name}: {extra[:5]}; pass weights of the same architecture")
    for name, tensor in first.items():
        if tensor.shape != second[name].shape:
            raise ValueError(f"`{name}` has shape {tuple(tensor.shape)} in {first_name} but "
                             f"{tuple(second[name].shape)} in {second_name}; pass weights of the same architecture")


def _check_weight(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


@torch.no_grad()
def ema_update(target: nn.Module | MutableMapping[str, torch.Tensor], source: nn.Module | Weights,
               alpha: float) -> None:
    """In place, ``target <- alpha * target + (1 - alpha) * source`` over float parameters and buffers, by name.

    ``alpha`` is the momentum kept by the target (LAE's ``ema_decay``; CoFiMA's EMA mode uses the
    opposite convention, ``ema <- (1 - beta) * ema + beta * model``, i.e. ``alpha = 1 - beta``).
    Integer tensors (counters) are left alone.
    """
    _check_weight(alpha, "EMA alpha")
    target_state, source_state = _float_state(target), _float_state(source)
    _check_same_layout(target_state, source_state, "EMA target", "EMA source")
    for name, tensor in target_state.items():
        update = source_state[name].to(device=tensor.device, dtype=tensor.dtype)
        tensor.mul_(alpha).add_(update, alpha=1.0 - alpha)


def average(weights: list[Weights]) -> dict[str, torch.Tensor]:
    """The mean of several models' tensors, by name (MOS's anchor: the mean of the earlier tasks' adapters)."""
    if not weights:
        raise ValueError("average needs at least one set of weights")
    for index, other in enumerate(weights[1:], start=1):
        _check_same_layout(weights[0], other, "weights[0]", f"weights[{index}]")
    return {name: torch.stack([w[name].float() for w in weights]).mean(0) for name in weights[0]}


def interpolate(params_a: Weights, params_b: Weights, weight_b: float) -> dict[str, torch.Tensor]:
    """``(1 - weight_b) * a + weight_b * b`` per tensor (CoFiMA without Fisher weighting)."""
    _check_weight(weight_b, "weight_b")
    _check_same_layout(params_a, params_b, "params_a", "params_b")
    return {name: torch.lerp(a, params_b[name].to(a), weight_b) for name, a in params_a.items()}


def diagonal_fisher(model: nn.Module, batches: Iterable[Any],
                    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                    params: Iterable[str] | None = None,
                    max_batches: int | None = None) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher: mean over batches of the squared gradient of each batch's loss.

    This is CoFiMA's estimate (``getFisherDiagonal``): per batch, backpropagate the batch-mean
    cross-entropy against the true labels, square the gradient, sum over batches, divide by the
    number of batches. It is not the per-sample squared-gradient mean (batches of one give that).
    CoFiMA runs it with the network in ``train()`` mode; set the mode you want before calling.

    ``loss_fn(model, batch)`` returns the batch's mean loss, so any batch layout and model output
    works. ``params`` names the parameters to estimate (default: all, as CoFiMA does); a frozen or
    unused parameter gets a zero Fisher. CoFiMA also caps the estimate at 1e-4; here that cap is
    applied by ``fisher_merge`` so the estimate itself stays unclipped. Does not touch ``.grad``.
    """
    named = dict(model.named_parameters())
    names = list(named) if params is None else list(params)
    unknown = [name for name in names if name not in named]
    if unknown:
        raise ValueError(f"diagonal_fisher: the model has no parameters named {unknown[:5]}")
    fisher = {name: torch.zeros_like(named[name]) for name in names}
    trainable = [name for name in names if named[name].requires_grad]
    if not trainable:
        raise ValueError("diagonal_fisher: none of the selected parameters requires grad; unfreeze them first")
    num_batches = 0
    for batch in islice(batches, max_batches):
        loss = loss_fn(model, batch)
        gradients = torch.autograd.grad(loss, [named[name] for name in trainable], allow_unused=True)
        for name, gradient in zip(trainable, gradients):
            if gradient is not None:
                fisher[name] += gradient.detach().pow(2)
        num_batches += 1
    if num_batches == 0:
        raise ValueError("diagonal_fisher got no batches; pass a non-empty loader (and max_batches >= 1)")
    return {name: value / num_batches for name, value in fisher.items()}


def fisher_merge(params_a: Weights, fisher_a: Weights, params_b: Weights, fisher_b: Weights,
                 weight_b: float = 0.4, fisher_max: float | None = 1e-4,
                 new_tensors: str = "copy") -> dict[str, torch.Tensor]:
    """CoFiMA's Fisher-weighted merge of model A (previous) and model B (current task).

    ``theta = ((1-l) Fa theta_a + l Fb theta_b) / ((1-l) Fa + l Fb)`` with ``l = weight_b``
    (CoFiMA's ``wt_alpha``; 0.4 in REFERENCE). Both Fishers are first capped from above at
    ``fisher_max`` (CoFiMA's ``fishermax = 1e-4`` applied with ``torch.min`` in ``getFisherDiagonal``:
    a ceiling, not a floor), which bounds how much one model can dominate an entry.

    An entry whose weighted Fisher sum is zero (e.g. a frozen parameter, zero gradient in both)
    takes the plain average ``(1-l) theta_a + l theta_b`` instead of the official NaN. A tensor
    only in ``params_b`` (a new head) is copied from B (``new_tensors="copy"``), or becomes
    ``Fb * theta_b`` with Fb capped (``"fisher_scaled"``, the official Fisher branch: about zero).
    """
    _check_weight(weight_b, "weight_b")
    if new_tensors not in ("copy", "fisher_scaled"):
        raise ValueError(f"new_tensors must be 'copy' or 'fisher_scaled', got {new_tensors!r}")
    if fisher_max is not None and fisher_max <= 0:
        raise ValueError(f"fisher_max must be positive or None, got {fisher_max}")
    shared_b = {name: params_b[name] for name in params_a if name in params_b}
    _check_same_layout(params_a, shared_b, "params_a", "params_b")
    for fisher, label in ((fisher_a, "fisher_a"), (fisher_b, "fisher_b")):
        _check_same_layout(params_a, {name: fisher[name] for name in params_a if name in fisher}, "params_a", label)
    merged = {}
    for name, theta_a in params_a.items():
        theta_b = params_b[name].to(theta_a)
        weighted_a = (1.0 - weight_b) * _capped(fisher_a[name].to(theta_a), fisher_max)
        weighted_b = weight_b * _capped(fisher_b[name].to(theta_a), fisher_max)
        total = weighted_a + weighted_b
        fisher_average = (weighted_a * theta_a + weighted_b * theta_b) / total
        plain_average = torch.lerp(theta_a, theta_b, weight_b)
        merged[name] = torch.where(total > 0, fisher_average, plain_average)
    for name, theta_b in params_b.items():
        if name not in params_a:
            scaled = new_tensors == "fisher_scaled"
            merged[name] = theta_b * _capped(fisher_b[name].to(theta_b), fisher_max) if scaled else theta_b.clone()
    return merged


def _capped(fisher: torch.Tensor, fisher_max: float | None) -> torch.Tensor:
    return fisher if fisher_max is None else fisher.clamp(max=fisher_max)


@torch.no_grad()
def emr_merge(vectors: list[Weights]) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], torch.Tensor]:
    """EMR-merging (Huang et al., NeurIPS 2024; elect, mask, rescale) of task vectors, by name, as TUNA's code
    (``emr_merge`` in LAMDA-CL/ICCV2025-TUNA@77d4f10 ``backbone/vit_tuna.py``) computes it:

    * elect: ``flag = +1`` where the mean over tasks is > 0, else ``-1`` (a zero mean elects -1, as the code);
      ``unified = flag * max_t |v_t * mask_t|``, the largest magnitude among the tasks that agree with the flag
      (0 where none does);
    * mask: ``mask_t = v_t * flag > 0``;
    * rescale: ``rescaler_t = sum_n mean|v_t[n]| / sum_n mean|unified[n] * mask_t[n]|`` (inf where no entry of
      ``v_t`` agrees with the flag, as the code's division).

    Returns (unified, masks per task, rescalers); a task's model is ``rescaler_t * mask_t * unified``.
    """
    if not vectors:
        raise ValueError("emr_merge needs at least one task vector")
    for index, other in enumerate(vectors[1:], start=1):
        _check_same_layout(vectors[0], other, "vectors[0]", f"vectors[{index}]")
    unified: dict[str, torch.Tensor] = {}
    masks: list[dict[str, torch.Tensor]] = [{} for _ in vectors]
    scales, masked_scales = torch.zeros(len(vectors)), torch.zeros(len(vectors))
    for name in vectors[0]:
        stacked = torch.stack([vector[name] for vector in vectors])
        flag = torch.where(stacked.mean(0) > 0, 1.0, -1.0).to(stacked)
        agree = stacked * flag > 0
        unified[name] = (stacked * agree).abs().amax(0) * flag
        for t in range(len(vectors)):
            masks[t][name] = agree[t]
            scales[t] += stacked[t].abs().mean().cpu()
            masked_scales[t] += (unified[name] * agree[t]).abs().mean().cpu()
    return unified, masks, scales / masked_scales
