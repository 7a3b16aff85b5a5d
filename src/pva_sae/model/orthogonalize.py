"""Weight orthogonalization: remove a direction d from everything a model writes into its residual stream.

The residual stream is the sum of the embedding and of every attention and MLP output, so it has no
component along a unit direction d at any layer exactly when none of those writes has one. The edits:

- embedding rows: ``E <- E - (E d) d^T``. Gemma-2 multiplies the embedding by sqrt(d_model) (a
  scalar) and applies no norm before the first layer, so d stays out.
- every attention output projection and MLP down projection, ``W (d_model, d_in)``: in models whose
  blocks add their outputs directly (Llama, Mistral, Qwen-2) ``W <- W - d (d^T W)``. Gemma-2 passes
  each output x through a post-attention / post-feedforward RMSNorm first, RMSNorm(x) = g * x / rms(x)
  with the gain g = 1 + w. Its component along d is (g * d) . x / rms(x), which is zero exactly when
  x is orthogonal to u = g * d, so the projection removes the unit u instead: ``W <- W - u (u^T W)``.
  Removing d itself from ``W``'s output (what an earlier study did) leaves g * x / rms(x) with a
  component along d.

The edits are computed in float32 and cast back to the weights' dtype: in bfloat16 what is left
along d is the rounding of that cast. Tied input/output embeddings (Gemma-2 ties them) must be untied
first (:func:`untie_embeddings`), else editing the embedding also changes the unembedding, which
ablation leaves alone. The hook equivalent of these edits is ``AblationHook(mode='writes')``
(:mod:`pva_sae.model.hooks`); ``mode='residual'`` (project d out of the residual itself) is the same
intervention only for models without post-norms: in Gemma-2 the post-norm's 1 / rms(x) depends on
the component removed, so no weight edit reproduces it.

Weights are edited in place, so any decoder holding references to the parameters (the fast
decoder) sees the edit; :func:`orthogonalized` restores the original values bit for bit afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from pva_sae.errors import InputError
from pva_sae.model.hooks import decoder_layers, residual_writers, submodule, unit_vector, write_directions


def untie_embeddings(model: Any) -> bool:
    """Give the unembedding its own copy of a tied embedding matrix; True when they were tied."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or out.weight is not inp.weight:
        return False
    out.weight = torch.nn.Parameter(inp.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    return True


def edits(model: Any, direction: torch.Tensor) -> list[tuple[str, torch.nn.Parameter, torch.Tensor, str]]:
    """Every residual-writing weight and the unit vector projected out of it:
    (name, parameter, unit vector (d_model,) float32, 'rows' for the embedding or 'outputs' for a linear)."""
    try:
        arch = residual_writers(model)
    except ValueError as exc:
        raise InputError(f"weight orthogonalization: {exc}; or use ablation.method=residual_hooks") from None
    d = unit_vector(direction)
    embed = model.get_input_embeddings().weight
    if d.numel() != embed.shape[1]:
        raise ValueError(f"direction has {d.numel()} dimensions, the model's residual {embed.shape[1]}")
    out = [("embed_tokens", embed, d, "rows")]
    for i, (layer, units) in enumerate(zip(decoder_layers(model), write_directions(model, d))):
        for path, u in zip((arch.attn_out, arch.mlp_out), units):
            linear = submodule(layer, path)
            if getattr(linear, "bias", None) is not None:
                raise InputError(f"layer {i} {path} has a bias; orthogonalizing biased writers is not implemented "
                                 f"(use ablation.method=residual_hooks)")
            out.append((f"layers.{i}.{path}", linear.weight, u, "outputs"))
    return out


def project_out(weight: torch.Tensor, u: torch.Tensor, axis: str) -> torch.Tensor:
    """``weight`` with unit ``u`` projected out in float32, cast back: 'rows' (vocab, d_model) -> W - (W u) u^T,
    'outputs' (d_model, d_in) -> W - u (u^T W)."""
    w = weight.detach().float()
    u = u.to(w.device)
    if axis == "rows":
        return (w - torch.outer(w @ u, u)).to(weight.dtype)          # (vocab, d_model)
    return (w - torch.outer(u, u @ w)).to(weight.dtype)              # (d_model, d_in)


@contextmanager
def orthogonalized(model: Any, direction: torch.Tensor, keep_device: str | torch.device = "cpu"
                   ) -> Iterator[list[str]]:
    """Inside the block the model's residual writers have ``direction`` projected out (in place); on exit the
    original weights come back exactly. Yields the edited parameter names. Tied embeddings are refused:
    call :func:`untie_embeddings` once after loading."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is not None and out.weight is inp.weight:
        raise InputError("the model ties its input and output embeddings: orthogonalizing the embedding would also "
                         "edit the unembedding; call pva_sae.model.orthogonalize.untie_embeddings(model) first")
    todo = edits(model, direction)
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for _, param, u, axis in todo:
                saved.append((param, param.detach().to(keep_device, copy=True)))
                param.copy_(project_out(param, u, axis))
        yield [name for name, *_ in todo]
    finally:
        with torch.no_grad():
            for param, original in saved:
                param.copy_(original.to(param.device))
