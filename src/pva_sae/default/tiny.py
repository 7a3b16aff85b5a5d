"""Byte-level BPE tokenizers and tiny Gemma-2 models.

A tiny model exercises every code path of the real one (Gemma-2 architecture, sliding and global
attention, soft-capping, a tokenizer that adds its own BOS) in milliseconds on a CPU. Tests build
one with random weights; the embedded default model is a trained one of the same family.

Special token ids follow Gemma's convention (pad 0, eos 1, bos 2), so code that handles the real
Gemma-2 tokenizer handles these too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GenerationConfig,
    PreTrainedTokenizerFast,
)

from pva_sae.config import DEFAULT_TEMPLATE

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>")  # ids 0, 1, 2
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2

PACKAGED_MBPP = Path(__file__).resolve().parent.parent / "assets" / "mbpp" / "mbpp.jsonl"

# Byte-level BPE starts from the 256 byte symbols; the special tokens come before them.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def build_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1024,
                        min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``.

    Byte-level so that any string (code, unicode, odd whitespace) round-trips exactly: generated
    programs are executed, so a lossy tokenizer would change what gets tested. The tokenizer adds
    exactly one BOS at the start of every encoding and no EOS, like Gemma's. Padding defaults to the
    left (generation); set ``tokenizer.padding_side`` to change it.
    """

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB_SIZE} "
                         f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens); pass a larger vocab_size")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    _check_special_ids(tok)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", padding_side="left",
        model_max_length=1_000_000,
    )


def _check_special_ids(tok: Any) -> None:
    """The trainer places special tokens first; the rest of pva-sae relies on ids 0/1/2."""
    for expected, token in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(token)
        if got != expected:
            raise RuntimeError(f"special token {token!r} got id {got}, expected {expected}")


def tiny_gemma2_config(vocab_size: int, n_layers: int = 2, d_model: int = 64, n_heads: int = 4,
                       n_kv_heads: int = 2, head_dim: int = 16, d_mlp: int = 128, max_position: int = 2048,
                       **overrides: Any) -> Gemma2Config:
    """A Gemma-2 config of any size, with this module's special token ids and eager attention.

    Eager because SDPA drops Gemma-2's attention-logit soft-capping. transformers does not write
    the attention implementation into config.json, so loaders must ask for it again
    (``pva_sae.model.registry.load_model`` does). ``query_pre_attn_scalar`` follows head_dim (as in
    gemma-2-2b) rather than the library default of 256.
    """

    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        num_hidden_layers=n_layers,
        hidden_size=d_model,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=head_dim,
        intermediate_size=d_mlp,
        max_position_embeddings=max_position,
        query_pre_attn_scalar=head_dim,
        sliding_window=min(4096, max_position),
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    kwargs.update(overrides)
    return Gemma2Config(**kwargs)


def mbpp_texts(path: str | Path = PACKAGED_MBPP) -> Iterator[str]:
    """One prompt-shaped document per MBPP task (description, tests, initiator, reference code).

    Read with ``json`` directly so the tiny model does not depend on the data module.
    """

    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            prompt = DEFAULT_TEMPLATE.format(text=row["text"], tests="\n".join(row["test_list"]),
                                             initiator="# Solution:")
            yield prompt + "\n" + row["code"].replace("\r\n", "\n")


def make_tiny_model(out_dir: str | Path, texts: Iterable[str] | None = None, seed: int = 0,
                    vocab_size: int = 512, **sizes: Any) -> Path:
    """Build a tokenizer and a random-weight Gemma-2 model and save both to ``out_dir``.

    ``AutoModelForCausalLM.from_pretrained(out_dir)`` and ``AutoTokenizer.from_pretrained(out_dir)``
    load them. The same arguments give the same files (weights drawn from a torch RNG seeded with
    ``seed`` inside a forked RNG scope, so the caller's global RNG is untouched). ``sizes`` go to
    :func:`tiny_gemma2_config`.
    """

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_bpe_tokenizer(texts if texts is not None else mbpp_texts(), vocab_size=vocab_size)
    # The trainer may stop below vocab_size on a small corpus; the model matches what it produced.
    config = tiny_gemma2_config(len(tokenizer), **sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma2ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
