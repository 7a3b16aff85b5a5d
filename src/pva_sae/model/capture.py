"""Residual-stream activations at the last prompt token, for many prompts and layers at once.

One forward pass per batch records every requested layer (hooks, see :mod:`pva_sae.hooks` for the
site convention); the pass stops right after the highest requested layer, so later layers and the
unembedding never run. Prompts are LEFT padded, so the last prompt token is position -1 of every
row, and position ids count real tokens only (as ``generate`` does), so a prompt's activations do
not depend on what it is batched with. Activations are saved as safetensors with their task ids,
layers and site.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from pva_sae.model.hooks import (
    CaptureHook,
    StopForward,
    check_layers,
    check_site,
    decoder_layers,
)

# --------------------------------------------------------------------------- tokenising and batching

def tokenize_prompts(tokenizer: Any, prompts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
    """Token ids of each prompt, special tokens (BOS) included, no padding.

    ``max_length`` keeps the BOS (if the tokenizer adds one) and the LAST ``max_length - 1`` tokens:
    the captured position stays the prompt's own last token, only earlier context is dropped.
    """
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length={max_length} is too small: it must leave room for BOS and one token")
    ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        raise ValueError(f"prompts {empty[:5]} encode to no tokens at all; remove empty prompts")
    if max_length is None:
        return ids
    bos = tokenizer.bos_token_id
    return [_truncate_left(row, max_length, bos) for row in ids]


def _truncate_left(row: list[int], max_length: int, bos: int | None) -> list[int]:
    if len(row) <= max_length:
        return row
    if bos is not None and row[0] == bos:
        return [bos] + row[len(row) - (max_length - 1):]
    return row[len(row) - max_length:]


def pad_id_of(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token, so batches cannot be padded; "
                         "set tokenizer.pad_token")
    return pad


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """Left-pad token rows: (input_ids, attention_mask, position_ids), each (batch, max_len) int64.

    Position ids count real tokens only (0 at the first real token), like ``generate``'s, so a padded
    row sees the same positions as the prompt alone.
    """

    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def batch_order(lengths: Sequence[int], sort_by_length: bool) -> list[int]:
    """Prompt indices in processing order: longest first when sorting (less padding, and an
    out-of-memory error shows up in the first batch rather than after an hour)."""
    order = list(range(len(lengths)))
    if sort_by_length:
        order.sort(key=lambda i: -lengths[i])
    return order


def _model_device(model: Any) -> "torch.device":
    device = getattr(model, "device", None)
    if device is not None:
        return device
    return next(model.parameters()).device


def _accepts(model: Any, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- capture

def capture_last_token(model: Any, tokenizer: Any, prompts: Sequence[str], layers: Sequence[int] | None = None,
                       site: str = "resid_post", batch_size: int = 16, sort_by_length: bool = True,
                       progress: bool = True, max_length: int | None = None,
                       max_batch_tokens: int | None = None) -> "torch.Tensor":
    """Residual at the last token of every prompt: (n_prompts, n_layers, d_model) float32 on CPU.

    Rows are in the ORIGINAL prompt order whatever ``sort_by_length`` does; columns follow ``layers``
    (default: every layer). One forward pass per batch (no generation, no KV cache) captures all
    layers. The model is put in eval mode for the call and restored afterwards. ``max_batch_tokens``
    caps rows x longest row per batch, so a rare very long prompt does not pad a whole batch.
    """

    check_site(site)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    layers = check_layers(model, range(len(decoder_layers(model))) if layers is None else layers)
    if len(prompts) == 0:
        raise ValueError("no prompts to capture: pass a non-empty list of strings")
    rows = tokenize_prompts(tokenizer, prompts, max_length)
    pad_id = pad_id_of(tokenizer)
    device = _model_device(model)
    with_positions = _accepts(model, "position_ids")
    order = batch_order([len(r) for r in rows], sort_by_length)
    out: torch.Tensor | None = None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), CaptureHook(model, layers, site=site, positions=-1, stop=True) as hook, \
                _progress_bar(len(rows), progress) as bar:
            for idx in _batches(order, [len(r) for r in rows], batch_size, max_batch_tokens):
                acts = _forward_batch(model, hook, [rows[i] for i in idx], pad_id, device, with_positions)
                if out is None:
                    out = torch.empty((len(rows), len(layers), acts.shape[-1]), dtype=torch.float32)
                out[torch.tensor(idx)] = acts
                bar.update(len(idx))
    finally:
        model.train(was_training)
    return out


def _batches(order: list[int], lengths: list[int], batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """Consecutive slices of ``order`` with at most batch_size rows and rows x longest <= max_tokens."""
    out: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        width = max(longest, lengths[i])
        if current and (len(current) == batch_size or (max_tokens is not None and (len(current) + 1) * width > max_tokens)):
            out.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, lengths[i])
    if current:
        out.append(current)
    return out


def _forward_batch(model: Any, hook: CaptureHook, rows: list[list[int]], pad_id: int, device: Any,
                   with_positions: bool) -> "torch.Tensor":
    """One forward pass; returns (batch, n_layers, d_model) float32 on CPU."""

    ids, mask, positions = left_pad(rows, pad_id)
    kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": False}
    if with_positions:
        kwargs["position_ids"] = positions.to(device)
    try:
        model(**kwargs)
    except StopForward:
        pass
    records = hook.take()
    missing = [layer for layer in hook.layers if len(records[layer]) != 1]
    if missing:
        raise RuntimeError(f"layers {missing} fired {[len(records[m]) for m in missing]} times in one forward "
                           f"pass instead of once; the model calls its decoder layers in an unexpected way")
    return torch.stack([records[layer][0] for layer in hook.layers], dim=1)  # (batch, n_layers, d_model)


def _progress_bar(total: int, enabled: bool):
    return tqdm(total=total, disable=not enabled, desc="capture", unit="prompt", leave=False)


# --------------------------------------------------------------------------- save / load


