"""Training JumpReLU sparse autoencoders, for models that have no published SAEs.

Method: Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU
Sparse Autoencoders" (arXiv 2407.14435), with the training recipe of Lieberum et al. 2024, "Gemma
Scope" (arXiv 2408.05147). The facts used, and where this module departs from them:

* Encoder ``pre = x @ W_enc + b_enc``, JumpReLU ``f = pre * H(pre - theta)`` with a learned
  threshold per latent, decoder ``x_hat = f @ W_dec + b_dec``; no ``b_dec`` subtraction before the
  encoder (GemmaScope's params.npz convention, :mod:`pva_sae.sae.jumprelu`).
* Loss ``||x - x_hat||^2 + lambda * ||f||_0`` (squared error summed over d_model, L0 = number of
  firing latents), both averaged over the batch.
* H and the JumpReLU are piecewise constant in theta, so theta gets its gradient from
  straight-through pseudo-derivatives with the rectangle kernel ``K(u) = 1[-1/2 < u < 1/2]`` and a
  bandwidth ``eps``: ``d JumpReLU / d theta := -(theta / eps) K((pre - theta) / eps)`` and
  ``d H(pre - theta) / d theta := -(1 / eps) K((pre - theta) / eps)``. The input ``pre`` gets the
  ordinary gradient ``H(pre - theta)`` through the JumpReLU and none through the L0 term.
  (Checked against the SAELens and saprmarks/dictionary_learning implementations.)
* theta is stored as ``log theta`` (the paper's parametrisation; it keeps theta positive).
  Under Adam a log parameter moves by about ``lr`` per step, so theta changes by a factor of about
  ``exp(lr)`` per step: with the paper's lr of 7e-5 it needs hundreds of thousands of steps to
  travel, which a short run does not have (SAELens issue #494 reports the same). Hence
  ``threshold_lr``, a separate and larger learning rate for ``log theta``.
* Inputs are multiplied by one fixed scalar so that ``E ||x||^2 = 1`` over the training data
  (GemmaScope section 3.1), which makes ``lambda``, ``eps`` and the initial threshold transfer
  between layers and models; the scalar is folded into the saved weights, so the saved SAE reads
  raw residuals (``b_enc``, ``b_dec`` and the threshold are divided by it; the weights are
  unchanged).
* Decoder rows have unit norm: after every step they are renormalised and, before it, the gradient
  component parallel to each row is removed (as saprmarks/dictionary_learning does). ``W_enc``
  starts as ``W_dec`` transposed, reported to keep latents from dying early. Adam with
  ``beta1 = 0``, ``beta2 = 0.999``, ``eps = 1e-8`` (the papers' settings); ``lambda`` is warmed up
  linearly from 0. Initial threshold and bandwidth 0.001 in normalised units are the papers' values.
* Departures, each a config field: learning rate 1e-3 rather than the papers' 7e-5 (runs of
  thousands, not hundreds of thousands, of steps on small SAEs), with a linear warm-up, then
  constant, then a linear decay to 0 over the last ``lr_decay_fraction``; gradient-norm clipping;
  ``b_dec`` starts at the data mean and ``b_enc`` at ``-mean @ W_enc`` (the encoder first sees
  centred inputs); ``target_l0`` adapts ``lambda`` multiplicatively until the mean L0 reaches the
  target, then freezes it for the rest of training (``target_l0=None`` keeps lambda fixed, as in
  the paper); latents that have not fired for ``dead_after_tokens`` tokens get a small loss pulling
  their pre-activations up to the threshold (``dead_loss_coefficient``: the pre-activation loss of
  Anthropic's January 2025 training update, restricted to dead latents as SAELens does).

Quality is measured on held-out activations (:func:`evaluate_sae`): fraction of variance explained
``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``, mean L0, and the share of dead latents (never
firing on the held-out set).

:func:`train_sae` trains one SAE; :func:`train_saes` trains several on the same tokens at once (the
layers of a model: one batched step costs on a GPU about what one SAE's step costs, since SAEs of
this size are bound by kernel launches, not arithmetic). :func:`collect_activations` reads the
residual stream (``resid_post``) of every token of a list of sequences; :func:`save_sae` writes
``params.npz`` (GemmaScope layout) and ``stats.json``; :func:`train_model_saes` does all of it for
the layers of a model.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pva_sae.model.hooks import CaptureHook, StopForward, assert_fired_once
from pva_sae.sae.loaders import save_gemmascope_npz


@dataclass
class SAETrainConfig:
    """Hyperparameters of one JumpReLU SAE training run (units: normalised inputs, ``E||x||^2 = 1``)."""

    d_sae: int = 1024
    """Number of latents (dictionary width)."""
    steps: int = 6000
    """Optimiser steps."""
    batch_size: int = 4096
    """Activation vectors (tokens) per step, drawn without replacement epoch by epoch."""
    lr: float = 1e-3
    """Adam learning rate of the encoder, decoder and biases."""
    threshold_lr: float = 1e-2
    """Adam learning rate of log(threshold); larger than ``lr`` because a log parameter moves by about
    its learning rate per step (see the module docstring)."""
    adam_betas: tuple[float, float] = (0.0, 0.999)
    """Adam (beta1, beta2); beta1 = 0 as in the JumpReLU and GemmaScope papers."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    lr_warmup_steps: int = 100
    """Linear learning-rate warm-up from 0 over this many steps."""
    lr_decay_fraction: float = 0.2
    """The learning rate decays linearly to 0 over this final fraction of the steps."""
    sparsity_coefficient: float = 1e-3
    """lambda, the L0 penalty weight: the fixed value, or the starting value when ``target_l0`` is set."""
    sparsity_warmup_steps: int = 1000
    """lambda rises linearly from 0 to its value over this many steps."""
    target_l0: float | None = 40.0
    """Mean L0 to steer lambda towards after the warm-up (None: lambda stays fixed, as in the paper)."""
    target_l0_rate: float = 0.005
    """Per-step change of log(lambda) per unit of log(L0 / target_l0) (clipped to +-0.5)."""
    adapt_until_fraction: float = 0.75
    """lambda is adapted until this fraction of the steps, then frozen while the learning rate decays."""
    bandwidth: float = 1e-3
    """Width eps of the rectangle kernel of the straight-through pseudo-derivatives."""
    init_threshold: float = 1e-3
    """Initial threshold of every latent."""
    init_b_dec_mean: bool = True
    """Start b_dec at the data mean and b_enc at -mean @ W_enc (else both at 0, as in GemmaScope)."""
    dead_after_tokens: int = 2_000_000
    """A latent that has not fired on this many consecutive training tokens counts as dead."""
    dead_loss_coefficient: float = 1e-3
    """Weight of the loss pulling dead latents' pre-activations up to their thresholds (0: off)."""
    grad_clip_norm: float | None = 1.0
    """Clip the global gradient norm to this value (None: no clipping)."""
    seed: int = 0
    """Seed of the initialisation and of the batch order."""
    device: str = "auto"
    """'auto' (CUDA when available, else CPU) or a torch device string."""
    log_every: int = 250
    """Record (and report) training statistics every this many steps."""


@dataclass
class SAETrainResult:
    """A trained SAE in raw input units (GemmaScope layout, float32 numpy arrays) and its statistics."""

    params: dict[str, Any]
    stats: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- straight-through estimators

def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUSTE(torch.autograd.Function):
    """``pre * H(pre - theta)``; theta's gradient through the rectangle-kernel pseudo-derivative."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_pre = grad * (pre > theta).to(pre.dtype)
        grad_theta = (-(theta / eps) * _rectangle((pre - theta) / eps) * grad).sum_to_size(theta.shape)
        return grad_pre, grad_theta, None


class StepSTE(torch.autograd.Function):
    """``H(pre - theta)``; no gradient to ``pre``, theta's through the pseudo-derivative."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_theta = (-(1.0 / eps) * _rectangle((pre - theta) / eps) * grad).sum_to_size(theta.shape)
        return None, grad_theta, None


def jumprelu_ste(pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    """JumpReLU with the straight-through threshold gradient: (..., batch, d_sae) -> same shape; theta's
    gradient is summed over the dimensions it was broadcast along."""
    return JumpReLUSTE.apply(pre, theta, eps)


def step_ste(pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    """Heaviside ``H(pre - theta)`` with the straight-through threshold gradient."""
    return StepSTE.apply(pre, theta, eps)


# --------------------------------------------------------------------------- training

def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def input_scale(acts: torch.Tensor, max_rows: int = 1_000_000) -> float:
    """The scalar s with ``E ||s x||^2 = 1`` (over at most ``max_rows`` evenly spaced rows)."""
    stride = max(1, acts.shape[0] // max_rows)
    sample = acts[::stride].float()
    msn = float(sample.pow(2).sum(-1).mean())
    if not math.isfinite(msn) or msn <= 0:
        raise ValueError(f"activations have mean squared norm {msn}; cannot normalise them")
    return 1.0 / math.sqrt(msn)


def _lr_factor(step: int, cfg: SAETrainConfig) -> float:
    warm = min(1.0, (step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps > 0 else 1.0
    decay_steps = int(cfg.steps * cfg.lr_decay_fraction)
    if decay_steps > 0 and step >= cfg.steps - decay_steps:
        return warm * max(0.0, (cfg.steps - step) / decay_steps)
    return warm


def _init_params(cfg: SAETrainConfig, n_groups: int, d_model: int, means: torch.Tensor, gen: torch.Generator,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """Unit-norm random decoder rows, the encoder their transpose, thresholds at ``init_threshold``.

    Every tensor has a leading group dimension (one SAE per group); ``means`` is (G, d_model)."""

    G, F = n_groups, cfg.d_sae
    W_dec = torch.randn(G, F, d_model, generator=gen)
    W_dec = (W_dec / W_dec.norm(dim=-1, keepdim=True)).to(device)        # (G, d_sae, d_model), unit rows
    W_enc = W_dec.transpose(1, 2).clone()                                  # (G, d_model, d_sae)
    b_dec = means[:, None, :].clone() if cfg.init_b_dec_mean else torch.zeros(G, 1, d_model, device=device)
    b_enc = -(b_dec @ W_enc) if cfg.init_b_dec_mean else torch.zeros(G, 1, F, device=device)   # (G, 1, d_sae)
    log_theta = torch.full((G, 1, F), math.log(cfg.init_threshold), device=device)
    params = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "log_threshold": log_theta}
    for p in params.values():
        p.requires_grad_(True)
    return params


def _loss(x: torch.Tensor, p: dict[str, torch.Tensor], cfg: SAETrainConfig, lam: torch.Tensor,
          dead: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per SAE ``||x - x_hat||^2 + lambda L0`` (+ the dead-latent term), averaged over the batch.

    ``x`` (G, B, d_model), ``lam`` (G,), ``dead`` (G, d_sae). Returns (loss summed over the SAEs,
    mse (G,), l0 (G,), activations (G, B, d_sae)); the SAEs share no parameter, so the summed loss
    gives each its own gradient.
    """

    theta = p["log_threshold"].exp()                                       # (G, 1, d_sae)
    pre = torch.baddbmm(p["b_enc"], x, p["W_enc"])                         # (G, B, d_sae)
    f = jumprelu_ste(pre, theta, cfg.bandwidth)                            # (G, B, d_sae)
    x_hat = torch.baddbmm(p["b_dec"], f, p["W_dec"])                       # (G, B, d_model)
    mse = (x - x_hat).pow(2).sum(-1).mean(-1)                              # (G,)
    l0 = step_ste(pre, theta, cfg.bandwidth).sum(-1).mean(-1)              # (G,)
    loss = mse + lam * l0
    if cfg.dead_loss_coefficient > 0:
        # Pull the pre-activations of dead latents up towards their thresholds (zero for live ones).
        gap = torch.relu(theta.detach() - pre) * dead[:, None, :].to(pre.dtype)   # (G, B, d_sae)
        loss = loss + cfg.dead_loss_coefficient * gap.sum(-1).mean(-1)
    return loss.sum(), mse, l0, f


def _clip_per_group(params: list[torch.Tensor], max_norm: float) -> None:
    """Clip each SAE's gradient norm separately (a global clip would couple the SAEs)."""
    sq = sum(p.grad.pow(2).flatten(1).sum(1) for p in params)               # (G,)
    factor = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(factor.view(-1, *([1] * (p.grad.ndim - 1))))


def train_sae(acts: torch.Tensor, cfg: SAETrainConfig | None = None, eval_acts: torch.Tensor | None = None,
              log: Callable[[str], None] | None = None, name: str = "sae") -> SAETrainResult:
    """Train a JumpReLU SAE on ``acts`` (n_tokens, d_model) and evaluate it on ``eval_acts``.

    ``acts`` may live on the CPU or on the training device, in any float dtype; batches are cast to
    float32 on the device. Returns the SAE in raw units (the input scale folded in) with its stats.
    """
    return train_saes([acts], cfg, None if eval_acts is None else [eval_acts], log=log, names=[name])[0]


def train_saes(acts: Sequence[torch.Tensor], cfg: SAETrainConfig | None = None,
               eval_acts: Sequence[torch.Tensor] | None = None, target_l0: Sequence[float | None] | None = None,
               log: Callable[[str], None] | None = None, names: Sequence[str] | None = None) -> list[SAETrainResult]:
    """Train one JumpReLU SAE per tensor of ``acts`` (each (n_tokens, d_model), the same tokens, e.g.
    the layers of one model) together: one batched step updates all of them, which on a GPU costs
    about what one SAE costs. The SAEs are independent (own input scale, lambda, L0 target, gradient
    clipping; Adam is element-wise). ``target_l0`` overrides ``cfg.target_l0`` per SAE.
    """

    cfg = cfg or SAETrainConfig()
    G = len(acts)
    n, d_model = (tuple(acts[0].shape) + (0, 0))[:2] if G else (0, 0)
    if G == 0 or any(a.ndim != 2 or tuple(a.shape) != (n, d_model) for a in acts) or n < 2:
        raise ValueError(f"acts must be (n_tokens, d_model) tensors of one shape with n_tokens >= 2, got shapes "
                         f"{[tuple(a.shape) for a in acts]}")
    names = list(names or [f"sae {g}" for g in range(G)])
    targets = list(target_l0) if target_l0 is not None else [cfg.target_l0] * G
    device = _device(cfg.device)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    scales = [input_scale(a) for a in acts]
    scale_t = torch.tensor(scales, device=device)[:, None, None]           # (G, 1, 1)
    means = torch.stack([a.float().mean(0).to(device) for a in acts]) * scale_t[:, :, 0]   # (G, d_model)
    params = _init_params(cfg, G, d_model, means, gen, device)
    W_dec, log_theta = params["W_dec"], params["log_threshold"]
    opt = torch.optim.Adam(
        [{"params": [params[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")], "lr": cfg.lr, "base_lr": cfg.lr},
         {"params": [log_theta], "lr": cfg.threshold_lr, "base_lr": cfg.threshold_lr}],
        betas=cfg.adam_betas, eps=cfg.adam_eps)

    log_lambda = torch.full((G,), math.log(cfg.sparsity_coefficient), device=device)  # on the device: no sync
    adapt = torch.tensor([t is not None for t in targets], device=device)
    target_t = torch.tensor([t if t is not None else 1.0 for t in targets], device=device)
    since_fired = torch.zeros(G, cfg.d_sae, dtype=torch.long, device=device)
    history: list[list[dict[str, float]]] = [[] for _ in range(G)]
    order = torch.randperm(n, generator=gen).to(acts[0].device)
    cursor = 0
    adapt_end = int(cfg.steps * cfg.adapt_until_fraction)
    started = time.perf_counter()
    for step in range(cfg.steps):
        if cursor + cfg.batch_size > n:
            order, cursor = torch.randperm(n, generator=gen).to(acts[0].device), 0
        idx = order[cursor:cursor + cfg.batch_size]
        cursor += cfg.batch_size
        x = torch.stack([a[idx].to(device=device, dtype=torch.float32) for a in acts]) * scale_t   # (G, B, d)

        warm = min(1.0, (step + 1) / cfg.sparsity_warmup_steps) if cfg.sparsity_warmup_steps > 0 else 1.0
        lam = log_lambda.exp() * warm                                      # (G,)
        dead = since_fired >= cfg.dead_after_tokens                        # (G, d_sae), from earlier steps
        loss, mse, l0, f = _loss(x, params, cfg, lam, dead)
        fired = (f.detach() != 0).any(1)                                  # (G, d_sae)
        since_fired = torch.where(fired, torch.zeros_like(since_fired), since_fired + x.shape[1])

        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            # Keep decoder rows on the unit sphere: drop the radial part of their gradient ...
            W_dec.grad -= (W_dec.grad * W_dec).sum(-1, keepdim=True) * W_dec
            if cfg.grad_clip_norm is not None:
                _clip_per_group(list(params.values()), cfg.grad_clip_norm)
            factor = _lr_factor(step, cfg)
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * factor
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=-1, keepdim=True)                       # ... and renormalise after the step.
            if cfg.sparsity_warmup_steps <= step < adapt_end:
                # Steer lambda towards the L0 target: multiplicative, clipped, only where a target is set.
                ratio = (l0.detach().clamp(min=1e-3) / target_t).log().clamp(-0.5, 0.5)
                log_lambda += cfg.target_l0_rate * ratio * adapt
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            _record(history, step, x, mse.detach(), l0.detach(), lam, dead, log_theta, started, names, log)
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - started

    results = []
    for g in range(G):
        raw = _fold_scale({k: v[g].detach() for k, v in params.items()}, scales[g])
        stats: dict[str, Any] = {
            "d_model": d_model, "d_sae": cfg.d_sae, "steps": cfg.steps, "batch_size": cfg.batch_size,
            "n_train_tokens": n, "tokens_seen": cfg.steps * cfg.batch_size, "input_scale": scales[g],
            "target_l0": targets[g], "final_lambda": float(log_lambda[g].exp()),
            "train_time_s": round(train_s, 2), "trained_together": G, "device": str(device),
            "train_last": history[g][-1] if history[g] else None,
        }
        if eval_acts is not None:
            stats["eval"] = evaluate_sae(raw, eval_acts[g], device=device)
        results.append(SAETrainResult(params=raw, stats=stats, history=history[g],
                                      config={**_config_dict(cfg), "target_l0": targets[g]}))
    return results


def _record(history, step, x, mse, l0, lam, dead, log_theta, started, names, log) -> None:
    """Append one row of training statistics per SAE (and report it)."""

    with torch.no_grad():
        var = (x - x.mean(1, keepdim=True)).pow(2).sum(-1).mean(-1)         # (G,)
        theta_median = log_theta.detach().exp().flatten(1).median(1).values
    for g, rows in enumerate(history):
        row = {"step": step, "mse": float(mse[g]), "l0": float(l0[g]),
               "fve": 1.0 - float(mse[g]) / max(float(var[g]), 1e-12), "lambda": float(lam[g]),
               "dead_fraction": float(dead[g].float().mean()), "threshold_median": float(theta_median[g]),
               "elapsed_s": round(time.perf_counter() - started, 2)}
        rows.append(row)
        if log is not None:
            log(f"[{names[g]}] step {step:6d}  mse {row['mse']:.4f}  fve {row['fve']:.3f}  L0 {row['l0']:7.1f}  "
                f"lambda {row['lambda']:.2e}  dead {row['dead_fraction']:.3f}  theta~{row['threshold_median']:.3g}")


def _fold_scale(p: dict[str, torch.Tensor], scale: float) -> dict[str, Any]:
    """Normalised-unit parameters -> raw-unit GemmaScope arrays (float32 numpy on the CPU).

    With ``x_n = s x``: ``pre_n = s (x W_enc + b_enc / s)`` and the decoder output is ``s x_hat``, so
    the raw SAE keeps W_enc and W_dec and divides b_enc, b_dec and the threshold by s.
    """
    theta = p["log_threshold"].exp().reshape(-1)
    out = {"W_enc": p["W_enc"], "W_dec": p["W_dec"], "b_enc": p["b_enc"].reshape(-1) / scale,
           "b_dec": p["b_dec"].reshape(-1) / scale, "threshold": theta / scale}
    return {k: v.float().cpu().contiguous().numpy() for k, v in out.items()}


def _config_dict(cfg: SAETrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["adam_betas"] = list(d["adam_betas"])
    return d


# --------------------------------------------------------------------------- evaluation

def encode_jumprelu(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """GemmaScope JumpReLU encoding: ``relu(pre) * (pre > threshold)``, float32."""

    pre = x.float() @ params["W_enc"] + params["b_enc"]
    return torch.relu(pre) * (pre > params["threshold"])


def evaluate_sae(params: dict[str, Any], acts: torch.Tensor, device: Any = "cpu",
                 batch_size: int = 8192) -> dict[str, Any]:
    """Fraction of variance explained, mean L0, dead-latent share and firing statistics on ``acts``.

    ``params`` in raw units (numpy arrays or tensors, GemmaScope keys). A latent is dead when it fires
    on none of the rows of ``acts``.
    """

    p = {k: torch.as_tensor(v).to(device=device, dtype=torch.float32) for k, v in params.items()}
    n = acts.shape[0]
    d_sae = p["W_enc"].shape[1]
    mean = acts.float().mean(0).to(device)
    sq_err = total_var = l0_sum = 0.0
    fires = torch.zeros(d_sae, dtype=torch.long, device=device)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            x = acts[start:start + batch_size].to(device=device, dtype=torch.float32)
            f = encode_jumprelu(x, p)                                      # (b, d_sae)
            x_hat = f @ p["W_dec"] + p["b_dec"]
            sq_err += float((x - x_hat).pow(2).sum())
            total_var += float((x - mean).pow(2).sum())
            active = f > 0
            l0_sum += float(active.sum())
            fires += active.sum(0)
    freq = fires.float() / max(n, 1)
    return {
        "n_tokens": int(n),
        "fve": 1.0 - sq_err / max(total_var, 1e-12),
        "mse_per_token": sq_err / max(n, 1),
        "mean_l0": l0_sum / max(n, 1),
        "dead_fraction": float((fires == 0).float().mean()),
        "dense_fraction": float((freq > 0.5).float().mean()),
        "max_firing_frequency": float(freq.max()) if d_sae else 0.0,
    }


def meets_targets(ev: dict[str, Any], min_fve: float = 0.8, l0_range: tuple[float, float] = (10, 100),
                  max_dead: float = 0.2) -> bool:
    """Whether an evaluation reaches the quality targets (FVE, mean L0 range, dead share)."""
    return (ev["fve"] >= min_fve and l0_range[0] <= ev["mean_l0"] <= l0_range[1]
            and ev["dead_fraction"] <= max_dead)


def save_sae(result: SAETrainResult, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``params.npz`` (GemmaScope layout, float32) and ``stats.json`` into ``out_dir``."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_gemmascope_npz(out / "params.npz", **result.params)
    doc = {"format": "gemmascope-npz", "arch": "jumprelu", **(extra or {}), "stats": result.stats,
           "config": result.config, "history": result.history}
    tmp = out / "stats.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out / "stats.json")
    return out / "params.npz"


# --------------------------------------------------------------------------- activations

def token_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Consecutive index groups of at most ``batch_size`` sequences whose padded size (count x longest)
    stays within ``max_batch_tokens`` (a longer sequence goes alone). Sort by length first for little padding."""
    batches: list[list[int]] = []
    longest = 0
    for i, n in enumerate(lengths):
        if batches and len(batches[-1]) < batch_size and max(longest, n) * (len(batches[-1]) + 1) <= max_batch_tokens:
            batches[-1].append(i)
            longest = max(longest, n)
        else:
            batches.append([i])
            longest = n
    return batches


def collect_activations(model: Any, sequences: Sequence[Sequence[int]], layers: Sequence[int],
                        batch_size: int = 32, pad_id: int = 0, skip_first: bool = True,
                        store_device: Any = "cpu", store_dtype: torch.dtype | None = None,
                        max_batch_tokens: int = 16_384,
                        progress: Callable[[int, int], None] | None = None) -> dict[int, torch.Tensor]:
    """Residual stream (``resid_post``) at every token of ``sequences``, for each of ``layers``.

    Sequences are token-id lists, each starting with the BOS token when the model expects one; they
    are right-padded per batch (a causal model's real positions do not see the padding), batches
    holding at most ``batch_size`` sequences and ``max_batch_tokens`` padded tokens (eager attention
    needs memory quadratic in the length). With ``skip_first`` the first position of every sequence
    (the BOS, whose residual is an outlier that carries no content) is left out. Returns
    ``{layer: (n_tokens, d_model)}`` on ``store_device`` in ``store_dtype`` (default float32), tokens
    in sequence order.
    """

    store_dtype = store_dtype or torch.float32
    layers = list(layers)
    device = next(model.parameters()).device
    first = 1 if skip_first else 0
    n_tokens = sum(max(0, len(s) - first) for s in sequences)
    d_model = model.config.get_text_config().hidden_size
    out = {layer: torch.empty((n_tokens, d_model), dtype=store_dtype, device=store_device) for layer in layers}
    batches = token_batches([len(s) for s in sequences], batch_size, max_batch_tokens)
    filled = done = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), CaptureHook(model, layers, positions=None, device=device, stop=True) as hook:
            for batch in batches:
                rows = [sequences[i] for i in batch]
                width = max(len(r) for r in rows)
                ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for i, r in enumerate(rows):
                    ids[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
                    mask[i, :len(r)] = 1
                keep = mask.clone()
                keep[:, :first] = 0
                keep = keep.bool().to(device)                              # (batch, width)
                try:  # the hook stops the pass after the last requested layer (no unembedding)
                    model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                except StopForward:
                    pass
                records = hook.take()
                count = int(keep.sum())
                for layer in layers:
                    h = records[layer][0]                                  # (batch, width, d_model)
                    out[layer][filled:filled + count] = h[keep].to(device=store_device, dtype=store_dtype)
                filled += count
                done += len(rows)
                if progress is not None:
                    progress(done, len(sequences))
            assert_fired_once(hook, len(batches))
    finally:
        model.train(was_training)
    return out


# --------------------------------------------------------------------------- all layers of a model

def train_model_saes(model: Any, sequences: Sequence[Sequence[int]], layers: Sequence[int], out_dir: str | Path,
                     cfg: SAETrainConfig | None = None, heldout_fraction: float = 0.05, seed: int = 0,
                     pad_id: int = 0, log: Callable[[str], None] | None = None) -> dict[int, SAETrainResult]:
    """Train one JumpReLU SAE per layer on a model's residual stream and save each under
    ``out_dir/layer_{L}/`` (``params.npz`` + ``stats.json``), ready for :func:`pva_sae.sae.loaders.load_sae_file`.

    ``sequences`` are token-id lists starting with BOS (text the SAEs should decompose); a seeded
    ``heldout_fraction`` of them is kept for the reported quality. Activations of all layers are
    collected in one pass per batch and kept on the CPU.
    """
    cfg = cfg or SAETrainConfig()
    order = list(range(len(sequences)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(len(order) * heldout_fraction))
    if n_held >= len(order):
        raise ValueError(f"{len(order)} sequences leave none for training after holding out {n_held}")
    held = [sequences[i] for i in order[:n_held]]
    train = [sequences[i] for i in order[n_held:]]
    acts = collect_activations(model, train, layers, pad_id=pad_id)
    held_acts = collect_activations(model, held, layers, pad_id=pad_id)
    trained = train_saes([acts[layer] for layer in layers], cfg, [held_acts[layer] for layer in layers], log=log,
                         names=[f"layer {layer}" for layer in layers])
    for layer, result in zip(layers, trained):
        save_sae(result, Path(out_dir) / f"layer_{layer}", extra={"layer": layer, "site": "resid_post"})
    return dict(zip(layers, trained))
