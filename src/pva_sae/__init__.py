"""pva-sae: does a language model know, before it writes code, whether that code will work?

Importing the package is cheap: torch and transformers load only when a stage needs them.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "build_dataset", "make_config"]


def __getattr__(name):
    if name in ("build_dataset", "make_config"):
        from pva_sae import api

        return getattr(api, name)
    raise AttributeError(f"module 'pva_sae' has no attribute {name!r}")
