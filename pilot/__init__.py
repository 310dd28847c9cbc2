"""pilot: continual learning on pre-trained models.

    import pilot
    result = pilot.run("exps/simplecil_p1.json", seeds=[1993])   # or a dict of config keys
    result.curve, result.average, result.matrix, result.to_frame()

The library API (``pilot.api``) is imported on first use, so ``import pilot`` stays fast.
"""
__version__ = "0.3.0"

_API = ("run", "load", "evaluate", "summarize", "list_learners", "config_for", "RunResult", "ResultSet", "TaskRecord")
__all__ = ["PilotError", *_API]


def __getattr__(name: str):
    if name in _API:
        from pilot import api

        return getattr(api, name)
    if name == "PilotError":
        from pilot.errors import PilotError

        return PilotError
    raise AttributeError(f"module 'pilot' has no attribute '{name}'")
