"""APER with VPT (PILOT's ``models/aper_vpt.py``): prompt tokens at every block (``vpt_type: "deep"``)
or before the first (``"shallow"``), trained on the first task; switched off for the pretrained branch."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pilot.errors import PilotError
from pilot.learners import register_learner
from pilot.learners._aper import APERLearner
from pilot.learners._first_task_adaptation import AdaptationConfig
from pilot.modules.adapters import attach_visual_prompts

VPT_TYPES = ("deep", "shallow")


@dataclass
class VPTConfig(AdaptationConfig):
    """PILOT's exps/aper_vpt_deep.json and aper_vpt_shallow.json."""

    vpt_type: str = "deep"
    prompt_token_num: int = 5  # prompt tokens per prompted layer


@register_learner("aper_vpt")
class APERVPT(APERLearner):
    config_class = VPTConfig

    @classmethod
    def validate_config(cls, config: VPTConfig) -> None:
        super().validate_config(config)
        if config.vpt_type.lower() not in VPT_TYPES or config.prompt_token_num < 1:
            raise PilotError(f"aper_vpt needs vpt_type 'deep' or 'shallow' and prompt_token_num >= 1, got "
                             f"'{config.vpt_type}' and {config.prompt_token_num}.")

    def adapt(self) -> tuple[nn.Module, nn.Module]:
        deep = self.config.vpt_type.lower() == "deep"  # PILOT writes "Deep" in some configs
        return self.hooked(attach_visual_prompts(self.require_vit(), self.config.prompt_token_num, deep))
