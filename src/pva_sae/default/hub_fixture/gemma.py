"""The files of ``google/gemma-2-2b``: config, generation config, tokenizer and sharded random weights.

``config.json`` and ``generation_config.json`` carry the published values of gemma-2-2b (at
``scale='tiny'`` only the shape fields shrink). Tensor names and shapes come from transformers'
``Gemma2ForCausalLM`` built on the meta device, so they are exactly what ``from_pretrained`` expects; the
embedding is tied, so there is no ``lm_head.weight``, as in the hub's checkpoint. The tokenizer is a
byte-level BPE trained on MBPP and the shipped general corpus, with Gemma's special tokens at Gemma's
ids, and padded with unreachable ``<unused{i}>`` entries to the full vocabulary size.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

from pva_sae.default.hub_fixture.cache import RepoWriter
from pva_sae.default.tiny import build_bpe_tokenizer

REPO_ID = "google/gemma-2-2b"
INIT_STD = 0.02  # config.initializer_range of gemma-2-2b


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    vocab_size: int
    trained_vocab: int   # BPE tokens learned from text; the rest of the vocabulary is filler
    n_shards: int


SHAPES = {
    "full": ModelShape(n_layers=26, d_model=2304, n_heads=8, n_kv_heads=4, head_dim=256, d_mlp=9216,
                       vocab_size=256_000, trained_vocab=32_768, n_shards=3),
    "tiny": ModelShape(n_layers=4, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_mlp=128,
                       vocab_size=1024, trained_vocab=1024, n_shards=2),
}


def model_config(shape: ModelShape, dtype: str) -> dict:
    """gemma-2-2b's published config.json with ``shape``'s sizes (``dtype``: that of the written weights)."""
    return {
        "architectures": ["Gemma2ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": 50.0,
        "bos_token_id": 2,
        "cache_implementation": "hybrid",
        "eos_token_id": 1,
        "final_logit_softcapping": 30.0,
        "head_dim": shape.head_dim,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": shape.d_model,
        "initializer_range": INIT_STD,
        "intermediate_size": shape.d_mlp,
        "max_position_embeddings": 8192,
        "model_type": "gemma2",
        "num_attention_heads": shape.n_heads,
        "num_hidden_layers": shape.n_layers,
        "num_key_value_heads": shape.n_kv_heads,
        "pad_token_id": 0,
        "query_pre_attn_scalar": shape.head_dim,  # 256 = head_dim in gemma-2-2b
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "torch_dtype": dtype,
        "transformers_version": "4.42.4",
        "use_cache": True,
        "vocab_size": shape.vocab_size,
    }


GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 2, "cache_implementation": "hybrid",
                     "eos_token_id": 1, "pad_token_id": 0, "transformers_version": "4.42.4"}


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


# --------------------------------------------------------------------------- tokenizer


def padded_tokenizer(texts: Iterable[str], shape: ModelShape):
    """A byte-level BPE (pad 0, eos 1, bos 2; one BOS added per encoding) with exactly ``vocab_size`` ids."""
    tokenizer = build_bpe_tokenizer(texts, vocab_size=shape.trained_vocab)
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    n_trained = len(vocab)
    if n_trained > shape.vocab_size:
        raise ValueError(f"the trained vocabulary ({n_trained}) exceeds vocab_size {shape.vocab_size}")
    for i in range(shape.vocab_size - n_trained):  # unreachable: no merge produces '<unused..>'
        vocab[f"<unused{i}>"] = n_trained + i
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))
    return tokenizer


def write_tokenizer(writer: RepoWriter, tokenizer, tmp_dir) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json, as save_pretrained writes them."""
    tokenizer.save_pretrained(tmp_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        path = tmp_dir / name
        if path.is_file():
            writer.add_bytes(name, path.read_bytes())


# --------------------------------------------------------------------------- weights


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every stored tensor of Gemma2ForCausalLM for ``config`` (tied lm_head left out)."""
    hf_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k not in ("architectures",)})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.get("tie_word_embeddings", True):
        shapes.pop("lm_head.weight", None)
    return shapes


def _init_tensor(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype):
    """Gemma's RMSNorm scales by (1 + weight): zeros is its identity; everything else N(0, INIT_STD).

    Each tensor has its own generator, seeded from ``seed`` and its name, so tensors can be drawn in
    parallel threads (torch releases the GIL) and the values do not depend on the order or the sharding.
    """
    if name.endswith("norm.weight"):
        return torch.zeros(shape, dtype=dtype)
    own = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    generator = torch.Generator().manual_seed(own)
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, INIT_STD, generator=generator).to(dtype)


def write_weights(writer: RepoWriter, config: dict, shape: ModelShape, seed: int, dtype: torch.dtype) -> int:
    """Seeded random weights in ``n_shards`` safetensors files plus model.safetensors.index.json; total bytes."""
    shapes = tensor_shapes(config)
    item = torch.empty((), dtype=dtype).element_size()
    sizes = {name: math.prod(s) * item for name, s in shapes.items()}
    total = sum(sizes.values())
    per_shard = math.ceil(total / shape.n_shards)
    groups: list[list[str]] = [[]]
    filled = 0
    for name in shapes:  # model order, as save_pretrained shards
        if filled >= per_shard and len(groups) < shape.n_shards:
            groups.append([])
            filled = 0
        groups[-1].append(name)
        filled += sizes[name]
    weight_map = {}
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for index, names in enumerate(groups, start=1):
        filename = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        with ThreadPoolExecutor(max_workers=threads) as pool:
            drawn = pool.map(lambda name: _init_tensor(name, shapes[name], seed, dtype), names)
            tensors = dict(zip(names, drawn))
        save_file(tensors, str(writer.path_for(filename)), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, filename))
        del tensors
    writer.add_bytes("model.safetensors.index.json",
                     _json_bytes({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def write_model_repo(writer: RepoWriter, texts: list[str], shape: ModelShape, seed: int, dtype: str, tmp_dir):
    """Every file of the model repository (staged; the caller commits)."""
    config = model_config(shape, dtype)
    writer.add_bytes("config.json", _json_bytes(config))
    writer.add_bytes("generation_config.json", _json_bytes(GENERATION_CONFIG))
    write_tokenizer(writer, padded_tokenizer(texts, shape), tmp_dir)
    return write_weights(writer, config, shape, seed, getattr(torch, dtype))
