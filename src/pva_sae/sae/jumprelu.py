"""JumpReLU SAE in GemmaScope's convention (Rajamanoharan et al. 2024; Lieberum et al. 2024).

``pre = x @ W_enc + b_enc``; ``acts = relu(pre) * (pre > threshold)``. GemmaScope does NOT subtract
``b_dec`` from the input. Decode: ``acts @ W_dec + b_dec`` (:class:`pva_sae.sae.base.SAE`).
"""

from __future__ import annotations

from typing import Any

import torch

from pva_sae.sae.base import SAE, as_float32, expect_shape


class JumpReLUSAE(SAE):
    """JumpReLU SAE (GemmaScope): ``acts = relu(pre) * (pre > threshold)``, no ``b_dec`` subtraction.

    Formula: Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with
    JumpReLU Sparse Autoencoders", eq. (3); GemmaScope's params.npz and its model card.
    """

    arch = "jumprelu"

    def __init__(self, W_enc, W_dec, b_enc, b_dec, threshold, meta: dict[str, Any] | None = None):
        super().__init__(W_enc, W_dec, b_enc, b_dec, meta)
        expect_shape("threshold", tuple(threshold.shape), (self.d_sae,))
        self.register_buffer("threshold", as_float32(threshold))  # (d_sae,)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_model) -> (..., d_sae) float32 activations; the input is cast to float32 first."""
        pre = self.pre_activations(x)                                     # (..., d_sae)
        return torch.relu(pre) * (pre > self.threshold)
