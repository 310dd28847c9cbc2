"""APER with AdaptFormer adapters (PILOT's ``models/aper_adapter.py``): one copy of the ViT serves both
branches, the adapters are off for the pretrained one."""
from pilot.learners import register_learner
from pilot.learners._aper import APERLearner
from pilot.learners._first_task_adaptation import AdaptationConfig


@register_learner("aper_adapter")
class APERAdapter(APERLearner):
    config_class = AdaptationConfig
