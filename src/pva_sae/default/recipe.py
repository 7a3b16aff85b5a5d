"""The recipe of the embedded default (every setting of the build) and the asset sizes it implies.

``prepare`` records the recipe in ``prepare.json``; ``train`` reads it back, and only the settings
in ``OVERRIDABLE`` may change there (the others shaped the prepared data). The size arithmetic lets
``prepare`` refuse a recipe whose assets would not fit ``max_asset_bytes`` before any training.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class Recipe:
    """Every setting of the build; ``prepare`` records it, ``train`` reads it (command-line overrides win)."""

    # data and tokenizer
    vocab_size: int = 4096
    min_frequency: int = 2
    train_max_chars_per_file: int = 50_000
    general_max_chars: int = 1_600_000
    memorized_seed: int = 1234
    memorized_fraction: float = 0.5
    max_train_files: int | None = None   # smoke tests: fewer files
    max_tasks: int | None = None         # smoke tests: fewer MBPP tasks
    # model
    n_layers: int = 6
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 64
    d_mlp: int = 1024
    max_position: int = 4096
    # language-model training
    seed: int = 0
    lm_steps: int = 3000
    lm_batch: int = 64
    seq_len: int = 512
    mbpp_fraction: float = 0.5
    lm_lr: float = 1e-3
    lm_warmup_fraction: float = 0.1
    lm_weight_decay: float = 0.01
    lm_grad_clip: float = 1.0
    lm_log_every: int = 50
    # SAEs
    sae_width: int = 1024
    sae_steps: int = 10000
    sae_batch: int = 4096
    sae_lr: float = 1e-3
    sae_threshold_lr: float = 1e-2
    sae_target_l0: float = 85.0
    sae_max_tokens: int = 1_500_000
    sae_heldout_fraction: float = 0.1
    sae_general_tokens: int = 200_000
    sae_prompt_end_copies: int = 8
    sae_retries: int = 2
    collect_batch: int = 32
    # evaluation and budget
    eval_batch: int = 128
    eval_max_new_tokens: int = 384
    max_asset_bytes: int = 30_000_000
    time_budget_s: float = 480.0   # SAE retries are skipped when they would end the train step after this


# Settings `train` (and `eval`) may override; the rest are fixed by `prepare`, whose own options add PREPARE_OPTIONS.
OVERRIDABLE = ("lm_steps", "lm_batch", "seq_len", "lm_lr", "sae_steps", "sae_batch", "sae_width", "sae_target_l0",
               "sae_max_tokens", "sae_retries", "sae_heldout_fraction", "sae_general_tokens", "n_layers", "d_model",
               "n_heads", "n_kv_heads", "head_dim", "d_mlp", "collect_batch", "eval_batch", "eval_max_new_tokens",
               "max_asset_bytes", "seed", "lm_log_every", "sae_prompt_end_copies", "time_budget_s")
PREPARE_OPTIONS = ("vocab_size", "max_train_files", "max_tasks", "train_max_chars_per_file", "general_max_chars",
                   "memorized_seed")


def recipe_from(info: dict[str, Any], overrides: dict[str, Any]) -> Recipe:
    """The recipe recorded in ``info`` (prepare.json or training.json), with the non-None ``overrides``."""
    fields = {f.name for f in dataclasses.fields(Recipe)}
    values = {k: v for k, v in info["recipe"].items() if k in fields}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Recipe(**values)


def count_parameters(recipe: Recipe, vocab_size: int) -> int:
    """Parameters of the Gemma-2 model (tied embeddings counted once), from the shapes alone."""
    d, h, kv, hd, m = recipe.d_model, recipe.n_heads, recipe.n_kv_heads, recipe.head_dim, recipe.d_mlp
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d      # q, k, v, o projections (no biases)
    mlp = 3 * d * m                                        # gate, up, down
    norms = 4 * d                                          # input, post-attn, pre-ffn, post-ffn RMSNorm
    return vocab_size * d + recipe.n_layers * (attn + mlp + norms) + d


def sae_file_bytes(d_model: int, d_sae: int) -> int:
    floats = 2 * d_model * d_sae + 2 * d_sae + d_model
    return 4 * floats + 5 * 200  # npz member headers


def projected_asset_bytes(recipe: Recipe, vocab_size: int, general_bytes: int, tokenizer_bytes: int) -> dict[str, int]:
    model = 2 * count_parameters(recipe, vocab_size) + 20_000          # bf16 weights + safetensors header
    saes = recipe.n_layers * (sae_file_bytes(recipe.d_model, recipe.sae_width) + 30_000)  # + stats.json
    small = 300_000                                                    # configs, training.json
    total = model + saes + general_bytes + tokenizer_bytes + small
    return {"model_weights": model, "saes": saes, "general_corpus": general_bytes, "tokenizer": tokenizer_bytes,
            "other": small, "total": total}


def check_budget(nbytes: int, recipe: Recipe, what: str) -> None:
    """Exit with a message when ``nbytes`` exceed the recipe's asset budget (the build's commands stop here)."""
    if nbytes > recipe.max_asset_bytes:
        raise SystemExit(f"ERROR: {what} is {nbytes / 1e6:.2f} MB, over the budget of "
                         f"{recipe.max_asset_bytes / 1e6:.2f} MB: shrink the model, the SAE width or the corpus")
