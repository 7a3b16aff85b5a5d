"""Training the language model of the embedded default, saving it, and loading it back.

Every batch holds two kinds of rows: whole memorized MBPP documents (``mbpp_fraction`` of the rows)
and windows of the standard-library training corpus (the rest), every row starting with BOS as
every prompt does at inference. The loss is the mean over the two kinds of each kind's per-token
cross-entropy.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    Gemma2ForCausalLM,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from pva_sae.default.prepared import Prepared
from pva_sae.default.recipe import Recipe
from pva_sae.default.records import log
from pva_sae.default.tiny import BOS_ID, EOS_ID, PAD_ID, tiny_gemma2_config


def model_config(recipe: Recipe, vocab_size: int) -> Gemma2Config:
    return tiny_gemma2_config(vocab_size, n_layers=recipe.n_layers, d_model=recipe.d_model,
                              n_heads=recipe.n_heads, n_kv_heads=recipe.n_kv_heads, head_dim=recipe.head_dim,
                              d_mlp=recipe.d_mlp, max_position=recipe.max_position)


class RowSampler:
    """Seeded training rows: corpus windows and memorized MBPP documents, every row starting with BOS."""

    def __init__(self, prep: Prepared, recipe: Recipe, seed: int):
        self.rng = np.random.default_rng(seed)
        self.bos = BOS_ID
        self.stream = prep.stream.astype(np.int64)
        self.window = recipe.seq_len - 1
        if len(self.stream) <= self.window:
            raise SystemExit(f"ERROR: the training corpus ({len(self.stream)} tokens) is shorter than one row")
        self.docs = [d.astype(np.int64) for d, m in zip(prep.docs, prep.memorized) if m]
        self.order: list[int] = []

    def corpus_rows(self, n: int) -> np.ndarray:
        starts = self.rng.integers(0, len(self.stream) - self.window, size=n)
        rows = np.stack([self.stream[s:s + self.window] for s in starts])       # (n, seq_len - 1)
        return np.concatenate([np.full((n, 1), self.bos), rows], axis=1)       # (n, seq_len)

    def mbpp_rows(self, n: int) -> list[np.ndarray]:
        """Documents in epochs of seeded permutations, so each is seen equally often."""
        out = []
        for _ in range(n):
            if not self.order:
                self.order = list(self.rng.permutation(len(self.docs)))
            out.append(self.docs[self.order.pop()])
        return out


def lm_row_losses(model: PreTrainedModel, rows: list[np.ndarray], device: torch.device,
                  autocast: bool) -> torch.Tensor:
    """Summed next-token cross-entropy of each right-padded row over its real tokens: (n_rows,)."""
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.from_numpy(np.asarray(r, dtype=np.int64))
        mask[i, :len(r)] = 1
    ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits   # (B, T, vocab)
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)                        # (B, T-1)
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
    return ce.sum(1)                                                                 # (B,)


def length_chunks(rows: Sequence[Any], max_padded_tokens: int, length: Callable[[Any], int] = len) -> list[list]:
    """Rows sorted by length and grouped so that no group pads to more than ``max_padded_tokens``
    (a few MBPP documents are thousands of tokens long; they go through in small groups)."""
    chunks: list[list] = []
    for r in sorted(rows, key=length):
        if chunks and length(r) * (len(chunks[-1]) + 1) <= max_padded_tokens:
            chunks[-1].append(r)
        else:
            chunks.append([r])
    return chunks


def accumulate_step(model: PreTrainedModel, parts: dict[str, list[np.ndarray]], device: torch.device,
                    autocast: bool, max_padded_tokens: int) -> dict[str, float]:
    """Backward pass of the mean over kinds of each kind's per-token loss.

    The rows of all kinds go through the model together, in length-sorted chunks of at most
    ``max_padded_tokens`` padded tokens (usually one). Returns the per-token loss of each kind."""
    n_targets = {kind: sum(len(r) - 1 for r in rows) for kind, rows in parts.items()}
    tagged = [(kind, r) for kind, rows in parts.items() for r in rows]
    totals = dict.fromkeys(parts, 0.0)
    for chunk in length_chunks(tagged, max_padded_tokens, length=lambda item: len(item[1])):
        sums = lm_row_losses(model, [r for _, r in chunk], device, autocast)         # (n_rows,)
        weights = torch.tensor([1.0 / (n_targets[kind] * len(parts)) for kind, _ in chunk], device=sums.device)
        (sums * weights).sum().backward()
        for (kind, _), value in zip(chunk, sums.detach().tolist()):
            totals[kind] += value
    return {kind: totals[kind] / n_targets[kind] for kind in parts}


def _optimizer(model: PreTrainedModel, recipe: Recipe, device: torch.device):
    """AdamW without weight decay on embeddings, norms and vectors, and a one-cycle cosine schedule."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.lm_weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=recipe.lm_lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lm_lr, total_steps=recipe.lm_steps,
                                                pct_start=recipe.lm_warmup_fraction, anneal_strategy="cos",
                                                cycle_momentum=False)
    return opt, sched


def train_lm(prep: Prepared, recipe: Recipe, device: torch.device) -> tuple[PreTrainedModel, dict[str, Any]]:
    """The trained model (float32, on ``device``) and its training statistics, loss curve included."""
    torch.manual_seed(recipe.seed)
    model = Gemma2ForCausalLM(model_config(recipe, prep.info["vocab_size"])).to(device)
    model.train()
    opt, sched = _optimizer(model, recipe, device)
    sampler = RowSampler(prep, recipe, recipe.seed)
    n_mbpp = max(1, round(recipe.lm_batch * recipe.mbpp_fraction)) if recipe.mbpp_fraction > 0 else 0
    n_corpus = recipe.lm_batch - n_mbpp
    autocast = device.type == "cuda"
    curve: list[dict[str, float]] = []
    started = time.perf_counter()
    tokens = 0
    budget = recipe.seq_len * recipe.lm_batch
    for step in range(recipe.lm_steps):
        parts = {}
        if n_corpus:
            parts["corpus"] = list(sampler.corpus_rows(n_corpus))
        if n_mbpp:
            parts["mbpp"] = sampler.mbpp_rows(n_mbpp)
        opt.zero_grad(set_to_none=True)
        losses = accumulate_step(model, parts, device, autocast, budget)
        loss = sum(losses.values()) / len(losses)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.lm_grad_clip)
        opt.step()
        sched.step()
        tokens += sum(len(r) for rows in parts.values() for r in rows)
        if step % recipe.lm_log_every == 0 or step == recipe.lm_steps - 1:
            row = {"step": step, "loss": loss, **{f"loss_{k}": v for k, v in losses.items()},
                   "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm),
                   "elapsed_s": round(time.perf_counter() - started, 2)}
            curve.append(row)
            log(f"lm step {step:5d}/{recipe.lm_steps}  loss {row['loss']:.4f}  corpus "
                f"{row.get('loss_corpus', float('nan')):.4f}  mbpp {row.get('loss_mbpp', float('nan')):.4f}  "
                f"lr {row['lr']:.2e}  {tokens / max(time.perf_counter() - started, 1e-9):,.0f} tok/s")
    if device.type == "cuda":
        torch.cuda.synchronize()
    stats = {"steps": recipe.lm_steps, "batch_rows": recipe.lm_batch, "corpus_rows_per_batch": n_corpus,
             "mbpp_rows_per_batch": n_mbpp, "tokens_seen": tokens,
             "train_time_s": round(time.perf_counter() - started, 1), "curve": curve,
             "final_loss": curve[-1] if curve else None, "parameters": sum(p.numel() for p in model.parameters()),
             "optimizer": {"name": "AdamW", "lr": recipe.lm_lr, "betas": [0.9, 0.95],
                           "weight_decay": recipe.lm_weight_decay, "schedule": "one-cycle (cosine)",
                           "warmup_fraction": recipe.lm_warmup_fraction, "grad_clip": recipe.lm_grad_clip,
                           "precision": "bf16 autocast" if autocast else "float32"}}
    return model, stats


def save_model(model: PreTrainedModel, prep: Prepared, out: Path) -> Path:
    """``out/model``: the model in bfloat16 with the prepared tokenizer, replacing what was there."""
    target = out / "model"
    if target.exists():
        shutil.rmtree(target)
    model = model.to(torch.bfloat16).eval()
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(prep.path / "tokenizer").save_pretrained(target)
    return target


def load_saved_model(model_dir: Path, device: torch.device) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The saved (bfloat16) model in float32, as the pipeline runs it on a CPU."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    tok = AutoTokenizer.from_pretrained(model_dir)
    return model.to(device).eval(), tok
