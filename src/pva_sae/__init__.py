"""pva-sae: does a language model know, before it writes code, whether that code will work?

Importing the package is cheap: torch and transformers load only when a stage needs them. The Python API is
exported lazily: the stage calls ``pva_sae.run``, ``build_dataset``, ``analyze``, ``validate``, ``steer`` and
``report`` (:mod:`pva_sae.pipeline`, which runs them through :mod:`pva_sae.stages`), and ``load_run`` and ``make_config``
(:mod:`pva_sae.api`).
"""

__version__ = "0.1.0"

__all__ = ["__version__", "run", "build_dataset", "analyze", "validate", "steer", "report", "load_run", "make_config"]
API = tuple(__all__[1:])
FROM_API = ("load_run", "make_config")   # the rest from the pipeline module, where the stages are called


def __getattr__(name):
    if name in API:
        import importlib

        return getattr(importlib.import_module("pva_sae.api" if name in FROM_API else "pva_sae.pipeline"), name)
    raise AttributeError(f"module 'pva_sae' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *API])
