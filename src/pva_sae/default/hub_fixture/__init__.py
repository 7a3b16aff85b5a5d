"""A local stand-in of the Hugging Face hub for gemma-2-2b, GemmaScope and pile-10k.

:func:`~pva_sae.default.hub_fixture.build.build_hub_fixture` writes a directory laid out like
``HF_HOME``: ``hub/`` is a hub cache (``models--google--gemma-2-2b``, ``models--google--gemma-scope-2b-pt-res``,
``datasets--NeelNanda--pile-10k``, each with ``blobs/``, ``refs/main`` and ``snapshots/<commit>/``) and
``datasets/`` the prepared copy ``datasets.load_dataset`` reads offline. With ``HF_HUB_OFFLINE=1`` and
``HF_HOME`` (or ``HF_HUB_CACHE`` and ``HF_DATASETS_CACHE``) pointing at it, the pipeline's own hub calls
resolve from it. Everything but the weights' values is the real thing at ``scale='full'``;
``scale='tiny'`` keeps names and layout at CPU-test shapes and writes a registry override declaring them.
"""
