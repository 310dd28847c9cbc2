"""Knowledge distillation between a frozen old network and the one being trained (iCaRL; FOSTER, DGR and
Coil's distillation terms are the same function in PILOT)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """PILOT's ``_KD_loss(pred, soft, T)`` (``models/icarl.py``, identical in ``foster.py`` and ``dgr.py``):

        -(1/B) * sum_i sum_c softmax(teacher_i / T)_c * log_softmax(logits_i / T)_c

    the cross-entropy of the student's tempered distribution against the teacher's, summed over the classes
    and averaged over the B rows of the batch; no T**2 factor. It differs from KL(teacher || student) by the
    teacher's entropy, a constant, so the gradients are KL's; the loss value is PILOT's. Why: the new network
    keeps the old one's answers on the old classes while it learns the new ones.
    """
    if logits.shape != teacher_logits.shape:
        raise ValueError(f"kd_loss: student logits {tuple(logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    soft_targets = F.softmax(teacher_logits / T, dim=1)
    return -(soft_targets * F.log_softmax(logits / T, dim=1)).sum() / logits.shape[0]
