"""pva-sae: does a language model know, before it writes code, whether that code will work?

Importing the package is cheap: torch and transformers load only when a stage needs them. The Python API
(:mod:`pva_sae.api`) is exported lazily: ``pva_sae.run``, ``build_dataset``, ``analyze``, ``validate``,
``steer``, ``report``, ``load_run`` and ``make_config``.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "run", "build_dataset", "analyze", "validate", "steer", "report", "load_run", "make_config"]
API = tuple(__all__[1:])


def __getattr__(name):
    if name in API:
        from pva_sae import api

        return getattr(api, name)
    raise AttributeError(f"module 'pva_sae' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *API])
