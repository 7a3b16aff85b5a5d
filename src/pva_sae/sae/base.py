"""The parts every SAE shares: float32 weight buffers, decode, decoder-row geometry and metadata.

Conventions (shapes are ``(rows, cols)``):

* ``W_enc (d_model, d_sae)``, ``b_enc (d_sae,)``, ``W_dec (d_sae, d_model)``, ``b_dec (d_model,)``.
* ``pre = x @ W_enc + b_enc``; an architecture (:mod:`pva_sae.sae.jumprelu`, :mod:`pva_sae.sae.topk`)
  turns ``pre`` into activations. Decode: ``acts @ W_dec + b_dec``.
* Everything is computed in float32: inputs (often bfloat16 residuals) are cast up first, because a
  latent whose pre-activation sits near its threshold flips under bfloat16 rounding.
* A latent "fires" when its activation is > 0.
"""

from __future__ import annotations

from typing import Any

import torch

from pva_sae.errors import PvaSaeError


class SAEError(PvaSaeError, ValueError):
    """An SAE could not be resolved, read or used; the message names the problem and the fix."""


def expect_shape(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    """Raise an ``SAEError`` naming tensor ``name`` when its shape ``got`` is not ``want``."""
    if got != want:
        raise SAEError(f"SAE tensor {name} has shape {got}, expected {want}: the file is not a consistent SAE")


def as_float32(t: Any) -> torch.Tensor:
    """A detached, contiguous float32 tensor of ``t`` (a tensor or an array)."""
    return torch.as_tensor(t).detach().to(torch.float32).contiguous()


class SAE(torch.nn.Module):
    """Shared parts: weights as float32 buffers, decode, decoder-row geometry, metadata.

    Subclasses define ``encode(x)``, (..., d_model) -> (..., d_sae); ``forward`` is ``decode(encode(x))``.
    """

    arch = "sae"
    """Architecture name recorded in ``meta['arch']`` by the loaders."""

    def __init__(self, W_enc, W_dec, b_enc, b_dec, meta: dict[str, Any] | None = None):
        super().__init__()
        d_model, d_sae = W_enc.shape
        expect_shape("W_dec", tuple(W_dec.shape), (d_sae, d_model))
        expect_shape("b_enc", tuple(b_enc.shape), (d_sae,))
        expect_shape("b_dec", tuple(b_dec.shape), (d_model,))
        self.register_buffer("W_enc", as_float32(W_enc))   # (d_model, d_sae)
        self.register_buffer("W_dec", as_float32(W_dec))   # (d_sae, d_model)
        self.register_buffer("b_enc", as_float32(b_enc))   # (d_sae,)
        self.register_buffer("b_dec", as_float32(b_dec))   # (d_model,)
        self.meta: dict[str, Any] = dict(meta or {})

    @property
    def d_model(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_sae={self.d_sae}"

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W_enc + b_enc`` in float32: (..., d_model) -> (..., d_sae)."""
        if x.shape[-1] != self.d_model:
            raise SAEError(f"input has last dimension {x.shape[-1]} but this SAE expects d_model "
                           f"{self.d_model}: activations from another model or layer site?")
        x = x.to(device=self.W_enc.device, dtype=torch.float32)
        return x @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not define encode")

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``z @ W_dec + b_dec``: (..., d_sae) -> (..., d_model), float32."""
        return z.to(device=self.W_dec.device, dtype=torch.float32) @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @property
    def decoder_norms(self) -> torch.Tensor:
        """L2 norm of every decoder row: (d_sae,)."""
        return self.W_dec.norm(dim=1)

    def unit_direction(self, idx: int) -> torch.Tensor:
        """Decoder row ``idx`` scaled to unit L2 norm: (d_model,). The raw norm is ``decoder_norms[idx]``."""
        if not 0 <= int(idx) < self.d_sae:
            raise SAEError(f"latent index {idx} is out of range: this SAE has {self.d_sae} latents")
        row = self.W_dec[int(idx)]
        norm = row.norm()
        if norm == 0:
            raise SAEError(f"latent {idx} has an all-zero decoder row (a dead latent): it has no direction")
        return row / norm
