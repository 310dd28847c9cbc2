"""APER with SSF (PILOT's ``models/aper_ssf.py``): scale and shift after every SSF site of the ViT,
trained on the first task; switched off for the pretrained branch."""
from __future__ import annotations

from torch import nn

from pilot.learners import register_learner
from pilot.learners._aper import APERLearner
from pilot.learners._first_task_adaptation import AdaptationConfig
from pilot.modules.adapters import attach_ssf


@register_learner("aper_ssf")
class APERSSF(APERLearner):
    config_class = AdaptationConfig  # PILOT's exps/aper_ssf.json: the adapter's keys (ffn_num unused)

    def adapt(self) -> tuple[nn.Module, nn.Module]:
        return self.hooked(attach_ssf(self.require_vit()))
