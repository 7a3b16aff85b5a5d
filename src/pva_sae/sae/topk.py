"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"), as LlamaScope trains them.

Keep the k largest entries of ``relu(pre)`` per row, zero the rest; ``pre = x @ W_enc + b_enc`` and
decode as in :class:`pva_sae.sae.base.SAE`.
"""

from __future__ import annotations

from typing import Any

import torch

from pva_sae.sae.base import SAE, SAEError, as_float32, expect_shape


class TopKSAE(SAE):
    """TopK SAE: keep the ``k`` largest entries of ``relu(pre)`` per row (Gao et al. 2024, sec. 2.3).

    ``rank_scale`` (d_sae,), when set, ranks latents by ``relu(pre) * rank_scale`` while keeping the
    values of ``relu(pre)``: OpenMOSS lm-saes does this with decoder-row norms when a checkpoint
    says ``sparsity_include_decoder_norm`` (``SparseAutoEncoder.encode``). Exactly ``k`` positions
    are kept per row (fewer are non-zero when fewer than ``k`` pre-activations are positive); ties
    at the k-th value are broken by ``torch.topk``.

    LlamaScope facts (verified in OpenMOSS/Language-Model-SAEs ``src/lm_saes/sae.py`` and SAELens
    ``llama_scope_sae_huggingface_loader``): the checkpoint stores torch Linear weights
    (``encoder.weight (d_sae, d_model)``, ``decoder.weight (d_model, d_sae)``, i.e. transposed);
    with ``norm_activation == 'dataset-wise'`` the input is multiplied by
    ``sqrt(d_model) / dataset_average_activation_norm['in']`` before encoding and the decoder output
    is in units scaled by ``sqrt(d_model) / ...['out']``. ``load_sae_file``
    (:mod:`pva_sae.sae.loaders`) folds both scalings (and a pre-encoder ``b_dec`` subtraction, if
    configured) into ``W_enc``, ``b_enc``, ``W_dec`` and ``b_dec``, so ``encode`` takes raw residuals
    and ``decode`` returns them. SAELens loads the published LlamaScope checkpoints as JumpReLU with
    the scalar ``jump_relu_threshold`` of their hyperparams.json (TopK-trained SAEs converted after
    training); when that file says ``act_fn: jumprelu``, ``load_sae_file`` builds a ``JumpReLUSAE``
    instead of this class. The registered release reads that scalar threshold as SAELens does
    (``threshold_convention`` 'saelens': ``pre > threshold * s_in``, decoder norms ignored; the
    LlamaScope authors' correction in SAELens PR #483); ``tests/test_llama.py`` checks the loaded SAE
    against SAELens' conversion of the same files. The released files themselves were not inspected
    (the hub was out of reach).
    """

    arch = "topk"

    def __init__(self, W_enc, W_dec, b_enc, b_dec, k: int, rank_scale=None, meta: dict[str, Any] | None = None):
        super().__init__(W_enc, W_dec, b_enc, b_dec, meta)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.d_sae:
            raise SAEError(f"TopK k must be an integer in 1..{self.d_sae}, got {k!r}")
        self.k = k
        if rank_scale is not None:
            expect_shape("rank_scale", tuple(rank_scale.shape), (self.d_sae,))
            rank_scale = as_float32(rank_scale)
        self.register_buffer("rank_scale", rank_scale)  # (d_sae,) or None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_model) -> (..., d_sae): ``relu(pre)`` at the top-k positions of each row, 0 elsewhere."""
        acts = torch.relu(self.pre_activations(x))                       # (..., d_sae)
        scores = acts if self.rank_scale is None else acts * self.rank_scale
        idx = scores.topk(self.k, dim=-1).indices                         # (..., k)
        return torch.zeros_like(acts).scatter_(-1, idx, acts.gather(-1, idx))
