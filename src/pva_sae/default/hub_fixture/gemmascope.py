"""The files of ``google/gemma-scope-2b-pt-res``: ``layer_{L}/width_16k/average_l0_{N}/params.npz``.

Each file has GemmaScope's five float32 arrays at their real shapes. Values are random but not
arbitrary: decoder rows are unit-norm (as GemmaScope's are), the encoder is the decoder's transpose,
``b_dec`` is the mean residual and ``b_enc`` centres the pre-activations, and each latent's threshold
is set from residuals of the fixture's own model at that layer (``resid_post``, as GemmaScope's layer
``L``) so that the latent fires on a seeded log-normal share of tokens whose mean makes the average
L0 the ``N`` of the folder name (scaled by ``fire_rate_per_l0`` at tiny shapes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pva_sae.default.hub_fixture.cache import RepoWriter
from pva_sae.model.hooks import CaptureHook, StopForward

REPO_ID = "google/gemma-scope-2b-pt-res"
WIDTH = "16k"
RATE_SIGMA = 1.0  # spread of log firing rates across latents (real SAEs span orders of magnitude)


@dataclass(frozen=True)
class SAEShape:
    d_sae: int
    fire_rate_per_l0: float  # a latent's mean firing rate = N * this (1/d_sae: the average L0 is N)


SAE_SHAPES = {"full": SAEShape(d_sae=16384, fire_rate_per_l0=1 / 16384),
              "tiny": SAEShape(d_sae=256, fire_rate_per_l0=1 / 1024)}


def repo_path(layer: int, l0: int) -> str:
    return f"layer_{layer}/width_{WIDTH}/average_l0_{l0}/params.npz"


def calibration_residuals(model, tokenizer, texts: list[str], layers: list[int], n_tokens: int, max_rows: int,
                          batch_rows: int = 8) -> dict[int, torch.Tensor]:
    """Per layer, resid_post of every token but BOS of the first ``max_rows`` texts with at least ``n_tokens``
    tokens, cut to ``n_tokens``: (rows * (n_tokens - 1), d_model) float32."""
    rows = [ids[:n_tokens] for ids in tokenizer(texts)["input_ids"] if len(ids) >= n_tokens][:max_rows]
    if not rows:
        raise ValueError(f"no calibration text has {n_tokens} tokens")
    device = next(model.parameters()).device
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    with torch.no_grad(), CaptureHook(model, layers, positions=None, stop=True, device=device) as hook:
        for start in range(0, len(rows), batch_rows):
            ids = torch.tensor(rows[start:start + batch_rows], device=device)  # (B, T), no padding
            try:
                model(input_ids=ids, use_cache=False)
            except StopForward:
                pass
            for layer, recorded in hook.take().items():
                out[layer].append(recorded[-1][:, 1:].reshape(-1, recorded[-1].shape[-1]))  # drop BOS
    return {layer: torch.cat(chunks) for layer, chunks in out.items()}


def sae_arrays(residuals: torch.Tensor, d_sae: int, mean_rate: float, generator: torch.Generator) -> dict:
    """GemmaScope arrays (on the CPU) for one layer, thresholds calibrated on ``residuals`` (n_tokens, d_model).

    Random values come from the CPU ``generator``; the calibration runs on the residuals' device.
    """
    n, d_model = residuals.shape
    device = residuals.device
    w_dec = torch.empty(d_sae, d_model).normal_(generator=generator)
    w_dec /= w_dec.norm(dim=1, keepdim=True)                                   # (d_sae, d_model), unit rows
    log_rate = torch.empty(d_sae).normal_(generator=generator) * RATE_SIGMA - RATE_SIGMA ** 2 / 2
    rate = (mean_rate * log_rate.exp()).clamp(1 / n, 0.5)
    k = (rate * n).round().long().clamp(1, n - 1).to(device)                   # tokens each latent fires on
    w_enc = w_dec.T.contiguous()                                               # (d_model, d_sae)
    mean = residuals.mean(0)
    b_enc = -(mean @ w_enc.to(device))
    pre_t = (residuals @ w_enc.to(device) + b_enc).T.contiguous()              # (d_sae, n)
    ranked = pre_t.topk(int(k.max()) + 1, dim=1).values                        # (d_sae, k_max + 1), descending
    rows = torch.arange(d_sae, device=device)
    threshold = (ranked[rows, k - 1] + ranked[rows, k]) / 2
    threshold = threshold.clamp_min(1e-3 * float(pre_t.std()))                 # JumpReLU needs pre > 0 too
    return {"W_enc": w_enc, "W_dec": w_dec, "b_enc": b_enc.cpu(), "b_dec": mean.cpu(), "threshold": threshold.cpu()}


def write_sae_repo(writer: RepoWriter, residuals: dict[int, torch.Tensor], canonical_l0: dict[int, int],
                   shape: SAEShape, seed: int) -> dict[int, float]:
    """One params.npz per layer in ``residuals``; returns each layer's measured mean L0 on its residuals."""
    measured = {}
    for layer in sorted(residuals):
        generator = torch.Generator().manual_seed(seed * 1000 + layer)
        arrays = sae_arrays(residuals[layer], shape.d_sae, canonical_l0[layer] * shape.fire_rate_per_l0, generator)
        dev = residuals[layer].device
        pre = residuals[layer] @ arrays["W_enc"].to(dev) + arrays["b_enc"].to(dev)
        measured[layer] = float((pre > arrays["threshold"].to(dev)).sum(1).float().mean())
        with open(writer.path_for(repo_path(layer, canonical_l0[layer])), "wb") as f:
            np.savez(f, **{key: value.numpy().astype(np.float32, copy=False) for key, value in arrays.items()})
    return measured
