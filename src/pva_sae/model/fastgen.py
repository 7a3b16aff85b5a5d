"""Fast batched decoding for Gemma-2: static KV cache, CUDA-graph decode step, steering inside the graph.

Hugging Face ``generate`` spends ~33 ms per decode step on a gemma-2-2b-shaped model whatever the
batch (kernel-launch and Python overhead; the arithmetic of a step at batch 256 takes ~2 ms on an
H100). This module runs the same network with the model's own weights (no copy) through a lean
forward:

- the KV cache is preallocated, (batch, kv_heads, max_len, head_dim) per layer; a step writes its
  keys and values at a position held in a device tensor, and attends over the filled part of the
  cache rounded up to ``KV_BUCKET`` positions (one captured graph per such length), not the whole
  static length;
- on CUDA one whole decode step - embedding, every layer, final norm, unembedding, soft-capping,
  greedy argmax, EOS bookkeeping, and the steering addition - is captured once as a CUDA graph and
  replayed, so a step costs one launch;
- stop strings and "all rows finished" are checked every ``check_every`` steps (one host sync per
  check, not per step); a row's tokens after its end are replaced by padding afterwards, exactly where
  ``generate`` would have stopped it, so outputs have ``generate``'s layout;
- steering adds ``alpha * direction`` (a device buffer) at one layer's output ('resid_post') or input
  ('resid_pre'), at prompt and/or generated positions, inside the captured step: steered decoding
  keeps the speed, and changing alpha or the direction needs no recapture.

The forward reproduces transformers' eager Gemma-2 op for op (RMSNorm in float32 with (1 + w),
RoPE in float32 then cast, query scaling by query_pre_attn_scalar^-0.5, attention soft-capping,
float32 softmax, sliding-window layers, final logit soft-capping), so greedy outputs equal
``generate``'s; tests check this on CPU and GPU. Sampling (temperature / top-p) runs outside the
graph on the graph's logits with a seeded generator, or, with per-row keys, inside it (below).

What the forward assumes is checked when a decoder is built (:func:`model_mismatches`: architecture,
embedding scale, activation, soft-caps, layer types and sliding window, query scaling, norms, RoPE,
biases), and one short prefill is compared with the model's own forward (:meth:`StaticDecoder.
verify`): a model the decoder would run differently is refused with :class:`FastGenError` instead
of silently generating other text. The embedding scale sqrt(d_model) is applied here (transformers
4.x multiplies in ``Gemma2Model.forward``, 5.x inside the embedding module), so both layouts run.

Continuous batching (:meth:`StaticDecoder.generate_queue`): a fixed number of slots decode at
once; when a row ends (EOS, a stop string, or its token limit) its slot takes the next prompt of the
queue, prefilled into that slot's cache rows, with per-row positions, write indices and masks, so
decode steps are not spent on finished rows (at most ``queue_check_every - 1`` steps between checks:
``check_every``, twice that for a model under ``SMALL_MODEL_PARAMS`` parameters).
Sampling there is keyed: a row's token at step t is drawn by inverting its categorical CDF at a
uniform number hashed from (row key, t), inside the captured step, so each sample depends on its
key only, never on its slot, its neighbours or the queue order. Steering there is per prompt: the
prompts of one queue share the steering layer, site and positions, and each brings its own
``alpha * direction`` (or none), held per slot in an (S, d_model) buffer of the captured state, written
when the slot takes the prompt and added in the slot's prefill and decode steps. An unsteered prompt
gets a zero row (x + 0 is x exactly), so its tokens are the unsteered ones. Finished rows are
reported as they end (``on_finish``), so a caller can consume them while the queue runs.

Attention (``attention=``): 'eager' computes it as above (matmuls, soft-cap, boolean masks, float32
softmax; a decode step attends over the filled cache rounded up to a length bucket, one graph per
bucket). 'flex' (CUDA) runs it through FlexAttention compiled to Triton kernels: the soft-cap is a
``score_mod``, padding, causality and the sliding window a ``mask_mod`` evaluated in the kernel, and
a decode step's block mask lets each row read only the cache blocks up to its own position, counted
on the device inside the captured step (one graph for every length). The layer's norms, projections
and MLP are compiled with it (fused), for the prefill too. Its scores stay in float32 where eager
rounds them to the weight dtype, so in bfloat16 near-ties can resolve differently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from pva_sae.errors import PvaSaeError


class FastGenError(PvaSaeError, ValueError):
    """The model cannot be run by the fast decoder (the message says why and what to use instead)."""


@dataclass(frozen=True)
class Steering:
    """Add ``alpha * direction`` at ``layer`` ('resid_post' = its output, 'resid_pre' = its input)."""

    layer: int
    direction: Any          # (d_model,) tensor
    alpha: float
    site: str = "resid_post"
    positions: str = "all"  # 'all', 'prompt' or 'generated'


def supports(model: Any) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "gemma2"


ACTIVATION = "gelu_pytorch_tanh"
LAYER_TYPES = ("sliding_attention", "full_attention")
_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
_PROJECTIONS = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))


def model_mismatches(model: Any) -> list[str]:
    """What in ``model`` differs from the Gemma-2 network the decoder computes (empty: nothing found)."""

    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) != "gemma2":
        return [f"model_type is {getattr(cfg, 'model_type', None)!r}, the decoder implements Gemma-2 only"]
    problems = []
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "sliding_window"):
        if not hasattr(cfg, name):
            problems.append(f"config has no {name}")
    if problems:
        return problems
    activation = getattr(cfg, "hidden_activation", None)
    if activation != ACTIVATION:
        problems.append(f"hidden_activation is {activation!r}, the decoder computes {ACTIVATION!r}")
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        cap = getattr(cfg, name)
        if cap is not None and not (isinstance(cap, (int, float)) and cap > 0):
            problems.append(f"{name} is {cap!r}, expected a positive number or None")
    scalar = cfg.query_pre_attn_scalar
    if not (isinstance(scalar, (int, float)) and scalar > 0):
        problems.append(f"query_pre_attn_scalar is {scalar!r}, expected a positive number")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        problems.append("num_attention_heads is not a multiple of num_key_value_heads")
    types = getattr(cfg, "layer_types", None)
    if types is None or len(types) != cfg.num_hidden_layers or any(t not in LAYER_TYPES for t in types):
        problems.append(f"layer_types is {types!r}, expected one of {LAYER_TYPES} per layer "
                        f"({cfg.num_hidden_layers} layers)")
    elif "sliding_attention" in types and not (isinstance(cfg.sliding_window, int) and cfg.sliding_window > 0):
        problems.append(f"sliding_window is {cfg.sliding_window!r} with sliding layers, expected a positive int")
    for name in ("rope_parameters", "rope_scaling"):
        rope = getattr(cfg, name, None) or {}
        kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "?"
        if kind != "default":
            problems.append(f"{name} has rope_type {kind!r}, the decoder implements default RoPE only")
    if getattr(cfg, "use_bidirectional_attention", None):
        problems.append("use_bidirectional_attention is set, the decoder is causal")
    inner = getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    if embed is None or not hasattr(embed, "weight"):
        return problems + ["model.model.embed_tokens is missing"]
    scale = getattr(embed, "embed_scale", None)
    if scale is not None:
        # Both sides multiply in the weight dtype (bfloat16 rounds sqrt(3584) = 59.87 to 59.75), so compare the
        # scales after that rounding.
        dtype = embed.weight.dtype
        theirs = float(torch.as_tensor(scale).to(dtype))
        ours = float(torch.tensor(cfg.hidden_size ** 0.5, dtype=dtype))
        if theirs != ours:
            problems.append(f"the embedding scale is {theirs}, the decoder multiplies by sqrt(hidden_size) = "
                            f"{ours} (in {dtype})")
    if not hasattr(getattr(inner, "rotary_emb", None), "inv_freq"):
        problems.append("model.model.rotary_emb.inv_freq is missing")
    norms = [getattr(inner, "norm", None)] + [getattr(layer, n, None) for layer in inner.layers for n in _NORMS]
    if any(n is None or not hasattr(n, "weight") or not hasattr(n, "eps") for n in norms):
        problems.append("a decoder layer lacks one of the four Gemma-2 RMSNorms (or their weight/eps)")
    elif len({float(n.eps) for n in norms}) != 1:
        problems.append("the RMSNorms use different eps values")
    elif any(not type(n).__name__.endswith("RMSNorm") for n in norms):
        problems.append("a norm is not an RMSNorm")
    if len(inner.layers) != cfg.num_hidden_layers:
        problems.append(f"the model has {len(inner.layers)} layers, its config says {cfg.num_hidden_layers}")
    for layer in inner.layers:
        for block, names in _PROJECTIONS:
            for name in names:
                lin = getattr(getattr(layer, block, None), name, None)
                if lin is None or not hasattr(lin, "weight"):
                    problems.append(f"{block}.{name} is missing")
                elif getattr(lin, "bias", None) is not None:
                    problems.append(f"{block}.{name} has a bias, the decoder has none")
        if problems:
            break
    if not hasattr(getattr(model, "lm_head", None), "weight"):
        problems.append("lm_head is missing")
    return problems


# Largest |fast - model| / max|model logit| accepted by the build-time parity check, per weight dtype. Rounding
# alone stays far below (float32 CPU ~1e-6, with TF32 matmuls ~1e-3; bfloat16 ~1e-2); what the check is for - a
# dropped embedding scale, a changed layer - gives errors of order 1. Small differences such as another GELU
# approximation are the structural checks' job.
PARITY_TOLERANCE = {torch.float32: 1e-2, torch.float64: 1e-6, torch.bfloat16: 1e-1, torch.float16: 5e-2}
PARITY_TOKENS = 6


PREFILL_SCRATCH_BYTES = 2 << 30  # attention scratch per prefill chunk: rows are prefilled in chunks within it


AUTO_BATCH_CAP = 1024  # the automatic batch size's upper bound (rows decoding at once)


def free_memory_batch_size(model: Any, max_len: int, budget_fraction: float = 0.8, cap: int = AUTO_BATCH_CAP) -> int:
    """The largest batch (at most ``cap``) whose KV cache and per-row buffers fit ``budget_fraction`` of the
    free GPU memory, after reserving the prefill scratch; 64 off CUDA."""

    cfg = model.config
    device = next(model.parameters()).device
    if device.type != "cuda":
        return min(cap, 64)
    free, _ = torch.cuda.mem_get_info(device)
    itemsize = next(model.parameters()).element_size()
    kv = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * max_len * itemsize
    hidden = 4 * max_len * max(cfg.hidden_size, cfg.intermediate_size) * 4      # prefill activations, float32
    logits = 3 * cfg.vocab_size * 4
    budget = budget_fraction * free - 2 * PREFILL_SCRATCH_BYTES
    return max(1, min(cap, int(budget // (kv + hidden + logits))))


# --------------------------------------------------------------------------- layer math (pure functions)
# Op for op as transformers' eager Gemma-2; pure (weights are arguments), so one torch.compile'd version
# serves every layer.

def _rms(x, gain, eps: float):
    """Gemma2RMSNorm: float32, x * rsqrt(mean(x^2) + eps) * (1 + w), cast back; ``gain`` = 1 + w (float32)."""

    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * gain).type_as(x)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


def _qkv(h, w, cos, sin, eps: float, n_heads: int, n_kv: int, hd: int):
    """Queries (B, H, T, hd) and keys, values (B, KV, T, hd), RoPE applied."""

    b, t, _ = h.shape
    x = _rms(h, w[0], eps)
    q = F.linear(x, w[1]).view(b, t, n_heads, hd).transpose(1, 2)
    k = F.linear(x, w[2]).view(b, t, n_kv, hd).transpose(1, 2)
    v = F.linear(x, w[3]).view(b, t, n_kv, hd).transpose(1, 2)
    c, s = cos[:, None], sin[:, None]
    return _rotate(q, c, s), _rotate(k, c, s), v


def _post(h, o, w, eps: float):
    """o_proj of the attention output o (B, T, H * hd), the norms, the MLP and both residuals."""
    h = h + _rms(F.linear(o, w[5]), w[4], eps)
    x = _rms(h, w[6], eps)
    x = F.linear(F.gelu(F.linear(x, w[7]), approximate="tanh") * F.linear(x, w[8]), w[9])
    return h + _rms(x, w[10], eps)


def _attend_mlp(h, q, keys, values, mask, w, eps: float, scaling: float, cap, n_heads: int, n_kv: int, hd: int):
    """Attention over the cache (soft-capped, masked, float32 softmax), o_proj, norms, MLP, residuals."""

    b, t, _ = h.shape
    # Grouped-query attention without materialising repeated K/V: query heads kv*G .. kv*G+G-1 share
    # KV head kv (transformers' repeat_kv order), so fold the G query heads into the row dimension.
    groups = n_heads // n_kv
    scores = torch.matmul(q.reshape(b, n_kv, groups * t, hd), keys.transpose(2, 3)) * scaling  # (B, KV, G*T, L)
    scores = scores.view(b, n_heads, t, -1)                                                     # (B, H, T, L)
    if cap is not None:
        scores = torch.tanh(scores / cap) * cap
    scores = scores.masked_fill(~mask[..., :scores.shape[-1]], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    o = torch.matmul(probs.view(b, n_kv, groups * t, -1), values)                               # (B, KV, G*T, hd)
    o = o.view(b, n_heads, t, hd).transpose(1, 2).reshape(b, t, -1)
    return _post(h, o, w, eps)


# --------------------------------------------------------------------------- FlexAttention
# The same attention through torch's FlexAttention: the soft-cap is a ``score_mod``, the causal, padding and
# sliding-window masks a ``mask_mod`` evaluated inside the kernel, and a block mask names the cache blocks each
# row reads (decode: only the blocks up to the row's own position, counted on the device inside the captured
# step, so one graph serves every cache length). Compiled, it runs as fused Triton kernels (a decoding kernel for
# one query per row); the scores stay in float32 inside the kernel (eager rounds them to the weight dtype first).

FLEX_BLOCK = 128
FLEX_RECOMPILE_LIMIT = 64  # compiled decode-step shapes allowed per sliding-window setting


def _flex_score_mod(cap):
    """Gemma-2's attention soft-cap as a FlexAttention score_mod (None: no cap)."""
    if cap is None:
        return None

    def soft_cap(score, b, h, q_idx, kv_idx):  # noqa: ARG001
        return torch.tanh(score / cap) * cap

    return soft_cap


def _flex_mask_mod(valid, qpos, window):
    """Key kv_idx is a real token (``valid`` (B, L)), not after the query and, with a window, less than
    ``window`` positions before it; query q_idx of row b sits at cache index ``qpos[b] + q_idx``."""

    def mask(b, h, q_idx, kv_idx):  # noqa: ARG001
        q = qpos[b] + q_idx
        keep = valid[b, kv_idx] & (kv_idx <= q)
        if window is not None:
            keep = keep & (q - kv_idx < window)
        return keep

    return mask


def _flex_attend_mlp(h, q, keys, values, block_mask, w, eps: float, scaling: float, score_mod, n_heads: int,
                     n_kv: int, hd: int, options=None):  # noqa: ARG001
    """As :func:`_attend_mlp`, the attention through FlexAttention."""
    b, t, _ = h.shape
    o = flex_attention(q, keys, values, score_mod=score_mod, block_mask=block_mask, scale=scaling,
                       enable_gqa=n_heads != n_kv, kernel_options=options)
    return _post(h, o.transpose(1, 2).reshape(b, t, -1), w, eps)


# One code object each, so the decode step's static compilations and the prefill's dynamic ones keep apart.
def _flex_decode(*args):
    return _flex_attend_mlp(*args)


def _flex_prefill(*args):
    # A prefill shorter than 128 tokens would otherwise be lowered to the decoding kernel, whose block sizes
    # do not fit a 128-position query block (torch 2.11: "No choices to select"); the main kernel serves every length.
    return _flex_attend_mlp(*args, options={"FORCE_USE_FLEX_ATTENTION": True})


def _qkv_prefill(*args):
    return _qkv(*args)


def flex_available(device) -> bool:
    """FlexAttention runs compiled on CUDA with Triton."""
    if torch.device(device).type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


ATTENTION = ("eager", "flex")


def _head(h, gain, eps: float, w_out, cap):
    """Final norm, unembedding, logit soft-capping; float32 logits (B, vocab)."""

    logits = F.linear(_rms(h, gain, eps), w_out)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


QUEUE_MIN_WIDTH = 256  # smallest cache length of a continuous-batching length bucket
# A model this small checks its queue every 2 x check_every steps: its decode step is so short that the host's
# check (reading tokens back, stop strings, refilling slots) costs more than the steps a finished row idles.
# Measured on one H200 with the embedded default (6 layers, d_model 256), 1,024 slots, 3,896 MBPP prompts:
# 909 samples/s checking every 16 steps, 1,092 every 32. By parameter count, so a run's schedule is fixed.
SMALL_MODEL_PARAMS = 100_000_000
# A decode step attends over the filled part of the cache rounded up to this many positions (one CUDA graph per
# length); with torch.compile'd layer math, coarser buckets keep the number of compiled shapes small.
KV_BUCKET = 128
KV_BUCKET_COMPILED = 512


def _renumbered(stop_check, members: Sequence[int]):
    """``stop_check`` for a bucket: its requests name prompts by their index in the whole queue."""
    if stop_check is None:
        return None
    return lambda requests: stop_check([(members[item], new, first) for item, new, first in requests])


def _renumbered_finish(on_finish, members: Sequence[int]):
    """``on_finish`` for a bucket: the finished rows named by their prompt's index in the whole queue."""
    if on_finish is None:
        return None
    return lambda rows: on_finish([(members[item], new, reason) for item, new, reason in rows])


def _write(cache, write_at, x):
    """Write x (B, KV, T, hd) into cache (B, KV, L, hd) at indices ``write_at``: (T,) for every row, or (B, 1)
    one index per row (T = 1)."""

    if write_at.dim() == 1:
        cache.index_copy_(2, write_at, x)
    else:
        b, kv, _, hd = x.shape
        cache.scatter_(2, write_at.view(b, 1, 1, 1).expand(b, kv, 1, hd), x)


_MASK32 = 0xFFFFFFFF


def _mix32(x):
    """A 32-bit integer finaliser (xor-shift-multiply) on int64 tensors holding values below 2^32."""

    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def keyed_uniform(keys, step):
    """One uniform number in (0, 1) per row, a pure function of the row's key (B, 2) int64 halves below 2^32
    and its step (B,) or scalar tensor: 24 random bits, float32."""

    x = _mix32(keys[:, 0] ^ _mix32((step + 0x9E3779B9) & _MASK32))
    x = _mix32(x ^ keys[:, 1])
    return ((x >> 8).float() + 0.5) / float(1 << 24)


def split_key(key: int) -> tuple[int, int]:
    """A row key (any int) as the two 32-bit halves ``keyed_uniform`` takes."""

    key &= (1 << 64) - 1
    return key & _MASK32, key >> 32


def nucleus_scores(logits, temperature: float, top_p: float):
    """``logits / temperature`` with every token outside the top-p nucleus set to -inf (the most likely token
    always stays), as ``generate``'s temperature and top-p warpers leave them."""
    scores = logits / temperature
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return scores


def keyed_pick(logits, temperature: float, top_p: float, keys, step):
    """Sample one token per row from softmax(logits / temperature) restricted to the top-p nucleus, by
    inverting the row's CDF at ``keyed_uniform(keys, step)``: no generator state, graph-capturable, and a
    row's draw does not depend on the other rows. Greedy argmax when temperature is 0."""

    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = nucleus_scores(logits, temperature, top_p)
    cdf = torch.softmax(scores, dim=-1).cumsum(dim=-1)
    u = keyed_uniform(keys, step)[:, None] * cdf[:, -1:]
    # The first token whose CDF exceeds u; a token of probability 0 is never chosen (its CDF equals its left
    # neighbour's), and rounding at the top end is clamped to the last token of positive probability.
    pick = (cdf <= u).sum(dim=-1)
    last_positive = (scores > float("-inf")).long().cumsum(-1).argmax(dim=-1)
    return torch.minimum(pick, last_positive)


class StaticDecoder:
    """Greedy or sampled decoding of a loaded ``Gemma2ForCausalLM`` (see the module docstring)."""

    def __init__(self, model: Any, eos_ids: Sequence[int], pad_id: int, check_every: int = 16,
                 use_cuda_graph: bool | None = None, compile: bool = False, verify: bool = True,
                 attention: str = "eager"):

        if not supports(model):
            raise FastGenError(f"the fast decoder implements Gemma-2 only, not {model.config.model_type!r}; "
                               "use generation.backend='hf'")
        problems = model_mismatches(model)
        if problems:
            raise FastGenError("the fast decoder cannot run this model exactly: " + "; ".join(problems)
                               + ". Use generation.backend='hf'")
        cfg = model.config
        self.model, self.cfg = model, cfg
        self.inner = model.model
        self.device = next(model.parameters()).device
        self.dtype = self.inner.embed_tokens.weight.dtype
        # sqrt(d_model) cast to the weight dtype, as transformers does (bfloat16 rounds sqrt(2304) to 48.0).
        self._embed_scale = torch.tensor(cfg.hidden_size ** 0.5, dtype=self.dtype, device=self.device)
        self.eos = torch.tensor(sorted(set(int(e) for e in eos_ids)), device=self.device)
        self.pad_id = int(pad_id)
        self.check_every = check_every
        small = sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS
        self.queue_check_every = 2 * check_every if small else check_every
        # A small model's queue is host-bound: the host reads one window while the device decodes the next (each
        # ended row then decodes one window more; a large model's device time is worth more than the overlap).
        self.queue_pipeline = small and self.device.type == "cuda"
        self.use_graph = self.device.type == "cuda" if use_cuda_graph is None else use_cuda_graph
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scaling = cfg.query_pre_attn_scalar ** -0.5
        self.sliding = [t == "sliding_attention" for t in cfg.layer_types]
        rope = self.inner.rotary_emb
        self.inv_freq = rope.inv_freq.float().to(self.device)
        self.rope_scale = float(getattr(rope, "attention_scaling", 1.0))
        self._graphs: dict[tuple, Any] = {}
        # (1 + w) of every RMSNorm, computed once (as transformers computes it on every call).
        norms = [self.inner.norm] + [getattr(layer, name) for layer in self.inner.layers for name in
                                     ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                                      "post_feedforward_layernorm")]
        self._gain = {id(m): 1.0 + m.weight.detach().float() for m in norms}
        self.eps = float(self.inner.norm.eps)
        self._weights = [self._layer_weights(i) for i in range(cfg.num_hidden_layers)]
        # Optional: the decode step's layer math through torch.compile (fused elementwise kernels); the
        # prefill stays eager (its shapes change with every batch).
        self._decode_fns = None
        if compile:

            self._decode_fns = tuple(torch.compile(f, dynamic=False) for f in (_qkv, _attend_mlp, _head))
        self._prefill_fns = (_qkv, _attend_mlp, _head)
        self._cap_arg = cfg.attn_logit_softcapping
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        self.attention = attention
        if attention == "flex":
            # FlexAttention only runs fast compiled: its layer function (attention, o_proj, norms, MLP) is
            # compiled for the decode step (static shapes, one graph) and for prefills (dynamic shapes), the
            # prefill's projections, norm and RoPE too.
            qkv, head = (self._decode_fns[0], self._decode_fns[2]) if compile else (_qkv, _head)
            self._decode_fns = (qkv, torch.compile(_flex_decode, dynamic=False), head)
            self._prefill_fns = (torch.compile(_qkv_prefill), torch.compile(_flex_prefill), _head)
            self._cap_arg = _flex_score_mod(cfg.attn_logit_softcapping)
            # The decode step compiles once per (batch shape, cache length, window); past torch's recompile limit
            # dynamo runs the step uncompiled, and uncompiled FlexAttention cannot be captured in a CUDA graph
            # (measured on torch 2.11: a failed capture after 16 shapes). Allow many shapes.
            windows = {cfg.sliding_window if s else None for s in self.sliding}
            limit = getattr(torch._dynamo.config, "recompile_limit", None)
            if limit is not None and limit < FLEX_RECOMPILE_LIMIT * len(windows):
                torch._dynamo.config.recompile_limit = FLEX_RECOMPILE_LIMIT * len(windows)
        if verify:
            self.verify()

    def verify(self, n_tokens: int = PARITY_TOKENS) -> float:
        """Compare one short prefill's last-position logits with the model's own forward; refuse on mismatch.

        Returns the relative error max|fast - model| / max|model|. Milliseconds: ``n_tokens`` tokens, one row.
        """

        vocab = self.cfg.vocab_size
        ids = (torch.arange(n_tokens, device=self.device) * 7919 + 3) % vocab
        ids = ids[None]
        with torch.inference_mode():
            expected = self.model(input_ids=ids, use_cache=False).logits[:, -1].float()
            got = self._prefill_logits(ids)
        scale = float(expected.abs().max()) or 1.0
        error = float((got - expected).abs().max()) / scale
        tolerance = PARITY_TOLERANCE.get(self.dtype, 5e-2)
        if not error <= tolerance:            # also refuses NaN
            raise FastGenError(
                f"the fast decoder's logits differ from the model's own forward by {error:.3g} (relative; "
                f"tolerance {tolerance:g} for {self.dtype}) on a {n_tokens}-token prompt: this model or this "
                "transformers version computes Gemma-2 differently from the fast decoder. Use generation.backend='hf'")
        return error

    def _prefill_logits(self, ids):
        """Last-position logits of unpadded prompts ``ids`` (B, T) through the decoder's prefill path."""

        b, t = ids.shape
        shape = (b, self.n_kv, t, self.head_dim)
        n = self.cfg.num_hidden_layers
        caches = ([torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)],
                  [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)])
        arange = torch.arange(t, device=self.device)
        masks = self._prefill_masks(torch.ones(b, t, dtype=torch.bool, device=self.device), t)
        zero = torch.zeros(self.cfg.hidden_size, dtype=self.dtype, device=self.device)
        return self._forward(ids, arange[None].expand(b, t), arange, masks, caches, zero, None, None, kv_len=t)

    # ------------------------------------------------------------------ the network

    def _layer_weights(self, i: int) -> tuple:
        layer = self.inner.layers[i]
        a, m = layer.self_attn, layer.mlp
        g = self._gain
        return (g[id(layer.input_layernorm)], a.q_proj.weight, a.k_proj.weight, a.v_proj.weight,
                g[id(layer.post_attention_layernorm)], a.o_proj.weight, g[id(layer.pre_feedforward_layernorm)],
                m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight, g[id(layer.post_feedforward_layernorm)])

    def _rope(self, positions):
        """cos, sin (B, T, head_dim) in the model dtype, from integer positions (B, T)."""

        freqs = positions[:, :, None].float() * self.inv_freq[None, None, :]     # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.rope_scale).to(self.dtype), (emb.sin() * self.rope_scale).to(self.dtype)

    def _layer(self, i: int, h, cos, sin, keys, values, write_at, mask, kv_len: int | None, fns=None):
        """One decoder layer on h (B, T, d); writes this step's K/V into the cache at ``write_at`` (T,) and
        attends to the first ``kv_len`` cache positions (all of them when None: the fixed-shape decode step)."""
        qkv, rest = (fns or self._prefill_fns)[:2]
        w = self._weights[i]
        q, k, v = qkv(h, w, cos, sin, self.eps, self.n_heads, self.n_kv, self.head_dim)
        _write(keys, write_at, k)              # cache writes stay outside compiled code (no copy-back)
        _write(values, write_at, v)
        if kv_len is not None:
            keys, values = keys[:, :, :kv_len], values[:, :, :kv_len]
        return rest(h, q, keys, values, mask[i], w, self.eps, self.scaling, self._cap_arg,
                    self.n_heads, self.n_kv, self.head_dim)

    def _forward(self, tokens, positions, write_at, mask, caches, delta, steer_layer, steer_site,
                 kv_len: int | None = None, fns=None, last=None):
        """Logits (B, vocab) float32 of the last position, or of position ``last`` (B,) of each row;
        tokens/positions (B, T); ``write_at`` (T,) cache indices shared by the rows, or (B, 1) per row."""
        h = F.embedding(tokens, self.inner.embed_tokens.weight) * self._embed_scale
        cos, sin = self._rope(positions)
        for i in range(self.cfg.num_hidden_layers):
            if i == steer_layer and steer_site == "resid_pre":
                h = h + delta
            h = self._layer(i, h, cos, sin, caches[0][i], caches[1][i], write_at, mask, kv_len, fns)
            if i == steer_layer and steer_site == "resid_post":
                h = h + delta
        head = (fns or self._prefill_fns)[2]
        h = h[:, -1] if last is None else h[torch.arange(h.shape[0], device=h.device), last]
        return head(h, self._gain[id(self.inner.norm)], self.eps, self.model.lm_head.weight,
                    self.cfg.final_logit_softcapping)

    def _masks(self, valid, query_pos, max_len: int):
        """Per layer (B, 1, T, L) bool: key is a real token, not in the future, and inside the sliding window.

        ``query_pos`` holds the queries' cache indices: (T,) shared by the rows, or (B, T) per row."""

        kpos = torch.arange(max_len, device=self.device)
        q = query_pos[..., :, None]
        causal = kpos <= q                                                              # (T, L) or (B, T, L)
        if causal.dim() == 2:
            causal = causal[None]
        base = valid[:, None, None, :] & causal[:, None]
        window = self.cfg.sliding_window
        if window is None or not any(self.sliding):
            return [base] * len(self.sliding)
        near = kpos > q - window
        slide = base & (near[None] if near.dim() == 2 else near)[:, None]
        return [slide if s else base for s in self.sliding]

    def _per_layer(self, make):
        """``make(window)`` once per distinct window (None: a global layer), as a list over the layers."""
        window = self.cfg.sliding_window
        made = {w: make(w) for w in {window if s else None for s in self.sliding}}
        return [made[window if s else None] for s in self.sliding]

    def _prefill_masks(self, valid, t: int):
        """Masks of a prefill: queries at cache indices 0..t-1 attend to keys 0..t-1 that ``valid`` (B, >= t)
        marks as real tokens."""
        if self.attention == "eager":
            return self._masks(valid, torch.arange(t, device=self.device), valid.shape[1])
        b = valid.shape[0]
        # Padded to whole blocks, so the mask function never reads past the end of its buffer.
        padded = torch.zeros((b, -(-t // FLEX_BLOCK) * FLEX_BLOCK), dtype=torch.bool, device=self.device)
        padded[:, :t] = valid[:, :t]
        start = torch.zeros(b, dtype=torch.long, device=self.device)
        return self._per_layer(lambda w: create_block_mask(_flex_mask_mod(padded, start, w), b, None, t, t,
                                                           device=self.device, BLOCK_SIZE=FLEX_BLOCK))

    def _step_masks(self, st: Any, qpos):
        """Masks of a decode step whose query of row b sits at cache index ``qpos[b]`` ((B,), or (1,) shared).
        Eager: boolean masks. Flex: the state's block masks (made on first use), whose count of blocks to read
        is updated here from ``qpos`` on the device, so the step stays capturable."""
        if self.attention == "eager":
            return self._masks(st.valid, qpos if qpos.shape[0] == 1 else qpos[:, None], st.valid.shape[1])
        b, length = st.valid.shape
        blocks = length // FLEX_BLOCK                   # flex states' caches are whole blocks long
        if st.flex is None:
            rows = qpos.shape[0]
            counts = torch.ones((rows, 1, 1), dtype=torch.int32, device=self.device)
            indices = torch.arange(blocks, dtype=torch.int32, device=self.device).expand(rows, 1, 1, blocks)
            where = qpos.expand(b) if rows == 1 else qpos
            st.flex = (counts, self._per_layer(lambda w: BlockMask.from_kv_blocks(
                counts, indices.contiguous(), BLOCK_SIZE=FLEX_BLOCK, mask_mod=_flex_mask_mod(st.valid, where, w),
                seq_lengths=(1, length), compute_q_blocks=False)))
        counts, masks = st.flex
        counts.copy_((qpos // FLEX_BLOCK + 1).clamp(max=blocks).to(torch.int32).view(-1, 1, 1))
        return masks

    def _cache_length(self, max_len: int) -> int:
        """Cache positions a state allocates: ``max_len``, rounded up to whole blocks for FlexAttention."""
        return -(-max_len // FLEX_BLOCK) * FLEX_BLOCK if self.attention == "flex" else max_len

    # ------------------------------------------------------------------ decoding

    @dataclass
    class _State:
        caches: tuple
        valid: Any
        tok: Any
        pos: Any
        idx: Any
        step: Any
        out: Any
        done: Any
        delta: Any
        logits: Any
        keys: Any = None
        flex: Any = None   # FlexAttention: (block counts, per-layer block masks) of the decode step

    def _allocate(self, b: int, max_len: int, max_new: int) -> "_State":
        max_len = self._cache_length(max_len)
        shape = (b, self.n_kv, max_len, self.head_dim)
        n = self.cfg.num_hidden_layers
        caches = ([torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)],
                  [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)])
        z = lambda *s, dt=torch.long: torch.zeros(s, dtype=dt, device=self.device)  # noqa: E731
        return self._State(caches, z(b, max_len, dt=torch.bool), z(b, 1), z(b, 1), z(1), z(1),
                           torch.full((b, max_new), self.pad_id, dtype=torch.long, device=self.device),
                           z(b, dt=torch.bool), torch.zeros(self.cfg.hidden_size, dtype=self.dtype, device=self.device),
                           torch.zeros((b, self.cfg.vocab_size), dtype=torch.float32, device=self.device),
                           z(b, 2))

    def _decode_step(self, st: "_State", steering: Steering | None, sampling: tuple, kv_len: int | None = None) -> None:
        """One decode step on the state's buffers (graph-capturable: no host sync, fixed shapes).

        ``sampling`` = (temperature, top_p, keyed): greedy and keyed sampling pick inside the step; other
        sampling leaves the logits in ``st.logits`` for a generator outside it."""
        masks = self._step_masks(st, st.idx)
        layer, site = (steering.layer, steering.site) if steering else (None, None)
        logits = self._forward(st.tok, st.pos, st.idx, masks, st.caches, st.delta, layer, site,
                               fns=self._decode_fns, kv_len=kv_len)
        temperature, top_p, keyed = sampling
        if temperature == 0 or keyed:
            self._advance(st, keyed_pick(logits, temperature, top_p, st.keys, st.step))
        else:
            st.logits.copy_(logits)                   # sampled outside the graph

    def _advance(self, st: "_State", nxt) -> None:
        nxt = torch.where(st.done, torch.full_like(nxt, self.pad_id), nxt)
        st.out.index_copy_(1, st.step, nxt[:, None])
        st.done |= torch.isin(nxt, self.eos)
        st.tok.copy_(nxt[:, None])
        st.pos.add_(1)
        st.idx.add_(1)
        st.step.add_(1)

    def _graph(self, st: Any, steering: Steering | None, sampling: tuple, step, mutable: Sequence[Any]):
        """The CUDA graph of ``step()`` on the buffers of ``st`` (captured once per state, steering layer/site
        and sampling); ``mutable`` are the buffers a step changes besides the KV cache, restored after capture."""
        key = (id(st), steering.layer if steering else None, steering.site if steering else None, sampling)
        if key in self._graphs:
            return self._graphs[key]
        saved = [t.clone() for t in mutable]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):                        # warm-up (allocator, cuBLAS workspaces)
                step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if getattr(self, "_pool_state", None) != id(st):
            # One memory pool for the graphs of a state (one per attention length): they replay one at a time on
            # one stream and keep nothing between replays outside the state's own buffers.
            self._pool, self._pool_state = torch.cuda.graph_pool_handle(), id(st)
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                step()
        except RuntimeError as exc:
            self._forget_graphs()                     # nothing of a failed capture is reused
            for t, s in zip(mutable, saved):
                t.copy_(s)
            capture = "graph capture" in str(exc) or "CUDACachingAllocator" in str(exc)
            if self.attention != "flex" or isinstance(exc, torch.OutOfMemoryError) or not capture:
                raise
            raise FastGenError(
                f"capturing the FlexAttention decode step in a CUDA graph failed ({type(exc).__name__}: "
                f"{str(exc)[:200]}). A known cause: the step was compiled for more batch shapes and cache lengths "
                f"than torch._dynamo.config.recompile_limit allows (now "
                f"{getattr(torch._dynamo.config, 'recompile_limit', '?')}), so dynamo ran it uncompiled, and "
                "uncompiled FlexAttention cannot be captured (the log then says 'hit config.recompile_limit'). "
                "Set generation.attention=eager (the default), or raise torch._dynamo.config.recompile_limit "
                "before generating") from exc
        for t, s in zip(mutable, saved):
            t.copy_(s)                                # undo the warm-up and capture steps
        # Cache writes of those steps land at positions every later step rewrites before it reads them.
        self._graphs = {k: v for k, v in self._graphs.items() if k[0] == id(st)}
        self._graphs[key] = graph
        return graph

    def _kv_bucket(self, needed: int, max_len: int) -> int:
        """Cache positions a step attends over: ``needed`` rounded up to the attention bucket, at most max_len
        (None with FlexAttention: its block mask reads only the filled blocks, one graph serves every length)."""
        if self.attention == "flex":
            return None
        bucket = KV_BUCKET_COMPILED if self._decode_fns is not None else KV_BUCKET
        return min(max_len, -(-needed // bucket) * bucket)

    def _runner(self, st: Any, steering: Steering | None, sampling: tuple, step_at, mutable: Sequence[Any]):
        """``run(kv_len)``: one step attending to the first kv_len cache positions, through that length's CUDA
        graph (captured on first use) when graphs are on."""

        def run(kv_len: int | None) -> None:
            if self.use_graph:
                self._graph(st, steering, (sampling, kv_len), lambda: step_at(kv_len), mutable).replay()
            else:
                step_at(kv_len)

        return run

    def generate(self, input_ids, attention_mask, max_new_tokens: int, *, steering: Steering | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, generator=None, stop_check=None,
                 row_keys: Sequence[int] | None = None) -> "torch.Tensor":
        """(B, P + T) token ids laid out like ``generate``'s: prompt, new tokens, padding after each row's end.

        ``stop_check(out, prompt_len, done) -> done`` (on CPU tensors) marks rows whose text hit a stop
        string; it is called every ``check_every`` steps. ``input_ids`` must be LEFT padded. With
        ``row_keys`` (one int per row) sampling is keyed (see :func:`keyed_pick`; ``generator`` unused) and
        gives each row what :meth:`generate_queue` gives it.
        """

        b, p = input_ids.shape
        max_len = p + max_new_tokens
        st = self._state_for(b, max_len, max_new_tokens)
        keyed = row_keys is not None and temperature > 0
        sampling = (float(temperature), float(top_p) if temperature > 0 else 1.0, keyed)
        external = temperature > 0 and not keyed
        if keyed:
            if len(row_keys) != b:
                raise ValueError(f"row_keys has {len(row_keys)} keys for {b} rows")
            st.keys.copy_(torch.tensor([split_key(int(k)) for k in row_keys], device=self.device))
        mask = attention_mask.to(self.device).bool()
        st.valid.zero_()
        st.valid[:, :p] = mask
        st.valid[:, p:] = True
        for cache in (*st.caches[0], *st.caches[1]):
            cache.zero_()
        st.out.fill_(self.pad_id)
        st.done.zero_()
        st.delta.zero_()
        positions = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 1)               # as generate's
        delta = self._delta(steering)
        with torch.inference_mode():
            if steering is not None and steering.positions in ("all", "prompt"):
                st.delta.copy_(delta)
            logits = self._prefill(input_ids.to(self.device), positions, st, steering)
            st.delta.copy_(delta if steering is not None and steering.positions in ("all", "generated")
                           else torch.zeros_like(st.delta))
            first = (keyed_pick(logits, temperature, top_p, st.keys, torch.zeros(1, dtype=torch.long,
                                                                               device=self.device))
                     if keyed else self._pick(logits, temperature, top_p, generator))
            st.tok.copy_(first[:, None])
            st.out[:, 0] = torch.where(st.done, self.pad_id, st.tok[:, 0])
            st.done |= torch.isin(st.tok[:, 0], self.eos)
            st.pos.copy_(positions[:, -1:] + 1)
            st.idx.fill_(p)
            st.step.fill_(1)
            run = self._runner(st, steering, sampling, lambda kv: self._decode_step(st, steering, sampling, kv),
                               (st.tok, st.pos, st.idx, st.step, st.out, st.done))
            steps = 1
            while steps < max_new_tokens:
                for _ in range(min(self.check_every, max_new_tokens - steps)):
                    run(self._kv_bucket(p + steps, max_len))     # this step writes and reads up to index p+steps-1
                    if external:
                        self._advance(st, self._pick(st.logits, temperature, top_p, generator))
                    steps += 1
                done = st.done.cpu()
                if stop_check is not None:
                    done = stop_check(torch.cat([input_ids.cpu(), st.out[:, :steps].cpu()], dim=1), p, done)
                    st.done.copy_(done.to(self.device))
                if bool(done.all()):
                    break
        return torch.cat([input_ids.cpu(), st.out[:, :steps].cpu()], dim=1)

    def _prefill(self, input_ids, positions, st: "_State", steering: Steering | None):
        """Run the prompt through the network in row chunks (bounded attention scratch); fills the KV cache
        and returns the last position's logits (B, vocab)."""

        b, p = input_ids.shape
        arange = torch.arange(p, device=self.device)
        layer, site = (steering.layer, steering.site) if steering else (None, None)
        rows = max(1, int(PREFILL_SCRATCH_BYTES // (self.n_heads * p * p * 16)))
        out = []
        for r0 in range(0, b, rows):
            r = slice(r0, r0 + rows)
            caches = ([c[r] for c in st.caches[0]], [c[r] for c in st.caches[1]])
            out.append(self._forward(input_ids[r], positions[r], arange, self._prefill_masks(st.valid[r], p), caches,
                                     st.delta, layer, site, kv_len=p))
        return torch.cat(out)

    # ------------------------------------------------------------------ continuous batching

    @dataclass
    class _Queue:
        caches: tuple
        valid: Any      # (S, L) all True: which keys a row may see is decided by its write index alone
        tok: Any        # (S, 1) the token each slot feeds next
        idx: Any        # (S, 1) its cache index, which is also its position (prompts start at index 0)
        nstep: Any      # (S,) tokens the slot's current prompt has generated
        out: Any        # (S, max_new + 1) generated tokens; the last column takes writes of finished rows
        done: Any       # (S,) the row ended on the device (EOS or token limit), or the slot is idle
        keys: Any       # (S, 2) sampling key of the slot's current prompt
        delta: Any      # (S, d_model) steering each slot's prompt adds at generated positions (zero: none)
        mark: Any       # (S,) columns of ``out`` the host has been sent (the last snapshot's tokens written)
        flex: Any = None  # FlexAttention: (block counts, per-layer block masks) of the decode step
        host: list = field(default_factory=lambda: [None, None])   # pinned snapshot buffers, used in turn
        turn: int = 0

    def generate_queue(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, slots: int, *,
                       steering: Steering | Sequence[Steering | None] | None = None, temperature: float = 0.0,
                       top_p: float = 1.0, keys: Sequence[int] | None = None, stop_check=None,
                       on_finish=None) -> list[tuple[list[int], str]]:
        """Generate every prompt of the queue with ``slots`` rows decoding at once (continuous batching).

        ``prompts`` are unpadded token id lists; ``keys`` one int per prompt (sampling, see
        :func:`keyed_pick`; required when temperature > 0). Returns, in prompt order, each prompt's new
        tokens up to and including the one that ended it, and why it ended: 'eos', 'stop' or 'length'.
        ``stop_check(requests) -> list[int | None]`` gets, every ``queue_check_every`` steps, one
        ``(prompt_index, new_tokens, first_unchecked)`` per running row and returns for each the first step
        >= first_unchecked at which the row's text ends with a stop string (None: none yet).
        ``steering`` is one :class:`Steering` for every prompt, or one per prompt (None: unsteered); the
        steered prompts of one queue must share layer, site and positions. ``on_finish(rows)`` is called
        after each check with ``(prompt_index, new_tokens, reason)`` of the rows that ended in it.
        A row's output equals what :meth:`generate` (with ``row_keys`` and that prompt's steering) gives it
        in any batch.
        """

        n = len(prompts)
        if n == 0:
            return []
        if slots < 1 or max_new_tokens < 1:
            raise ValueError(f"slots and max_new_tokens must be >= 1, got {slots} and {max_new_tokens}")
        per_prompt = self._per_prompt_steering(steering, n)
        if temperature > 0 and (keys is None or len(keys) != n):
            raise ValueError("sampling with generate_queue needs one key per prompt")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("generate_queue got an empty prompt")
        # Length buckets: a cache as long as the queue's longest prompt would make every step attend over
        # its length (MBPP has one prompt of ~2,600 tokens among hundreds of ~150); prompts whose
        # prompt + max_new_tokens round up to the same power of two share one queue.
        buckets: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            buckets.setdefault(max(QUEUE_MIN_WIDTH, 1 << (len(p) + max_new_tokens - 1).bit_length()), []).append(i)
        results: list = [None] * n
        for width in sorted(buckets):
            members = buckets[width]
            part = self._run_queue([prompts[i] for i in members], max_new_tokens, slots,
                                   [per_prompt[i] for i in members], temperature, top_p,
                                   None if keys is None else [keys[i] for i in members],
                                   _renumbered(stop_check, members), _renumbered_finish(on_finish, members))
            for i, r in zip(members, part):
                results[i] = r
        return results

    def _per_prompt_steering(self, steering, n: int) -> list[Steering | None]:
        """One Steering (or None) per prompt; refuses steerings that differ in layer, site or positions."""
        if steering is None or isinstance(steering, Steering):
            return [steering] * n
        per_prompt = list(steering)
        if len(per_prompt) != n:
            raise ValueError(f"generate_queue got {len(per_prompt)} steerings for {n} prompts")
        where = {(s.layer, s.site, s.positions) for s in per_prompt if s is not None}
        if len(where) > 1:
            raise ValueError(f"the prompts of one queue must share the steering layer, site and positions; got "
                             f"{sorted(where)}: run one queue per (layer, site, positions)")
        return per_prompt

    def _slot_deltas(self, steerings: Sequence[Steering | None]):
        """(prompt delta, generated delta) per distinct steering of a queue: alpha * direction at the positions
        it steers, zeros elsewhere (and for None)."""
        zero = torch.zeros(self.cfg.hidden_size, dtype=self.dtype, device=self.device)
        deltas: dict[int, tuple] = {id(None): (zero, zero)}
        for s in steerings:
            if id(s) not in deltas:
                d = self._delta(s)
                deltas[id(s)] = (d if s.positions in ("all", "prompt") else zero,
                                 d if s.positions in ("all", "generated") else zero)
        return deltas

    def _run_queue(self, prompts, max_new_tokens: int, slots: int, steerings, temperature: float, top_p: float,
                   keys, stop_check, on_finish=None) -> list[tuple[list[int], str]]:
        n = len(prompts)
        slots = min(slots, n)
        max_len = max(len(p) for p in prompts) + max_new_tokens
        st = self._queue_for(slots, max_len, max_new_tokens)
        sampling = (float(temperature), float(top_p) if temperature > 0 else 1.0, temperature > 0)
        # The steering of the queue's layer and site (None: no prompt is steered, nothing is added anywhere).
        steering = next((s for s in steerings if s is not None), None)
        deltas = self._slot_deltas(steerings)
        eos = {int(e) for e in self.eos.tolist()}
        every = self.queue_check_every
        results: list[tuple[list[int], str] | None] = [None] * n
        slot_item = [-1] * slots
        checked = [0] * slots
        # Each slot's new tokens read back so far (its current prompt's): a check copies only the columns written
        # since the last one, not every row's whole output.
        tokens: list[list[int]] = [[] for _ in range(slots)]
        # What the host knows of each slot from the last snapshot read (or its refill): cache index, whether the
        # device has ended the row, and the slot's epoch (bumped at each refill: a snapshot taken before a refill
        # describes the slot's previous prompt and is skipped).
        known_idx, known_done, epoch = [0] * slots, [True] * slots, [0] * slots
        pending = iter(range(n))

        def fill(free: list[int]) -> None:
            chosen = []
            for slot in free:
                item = next(pending, None)
                if item is None:
                    break
                chosen.append((slot, item))
            for slot in free[len(chosen):]:
                slot_item[slot] = -1
                st.done[slot] = True
            if chosen:
                for slot, item in chosen:
                    slot_item[slot], checked[slot], tokens[slot] = item, 0, []
                    known_idx[slot], known_done[slot] = len(prompts[item]), False
                    epoch[slot] += 1
                self._queue_prefill(st, chosen, prompts, keys, steering,
                                    [deltas[id(steerings[item])] for _, item in chosen], sampling, max_new_tokens)

        def launch():
            """Queue ``every`` decode steps and a snapshot of what they wrote; None when no row is running."""
            live = [known_idx[slot] for slot in range(slots) if slot_item[slot] >= 0 and not known_done[slot]]
            if not live:
                return None
            top = max(live)                 # rows that are done stop advancing, so this bounds every step
            for j in range(every):
                run(self._kv_bucket(top + j + 1, max_len))
            return self._queue_snapshot(st, max_new_tokens, every), list(epoch)

        def absorb(snap) -> list[list[int]]:
            """Wait for a snapshot; note each current slot's index and device end."""
            data = self._snapshot_rows(snap[0])
            for slot, row in enumerate(data):
                if slot_item[slot] >= 0 and snap[1][slot] == epoch[slot]:
                    known_idx[slot], known_done[slot] = row[2], bool(row[3])
            return data

        def process(data, taken: list[int]) -> None:
            """Read a snapshot's new tokens, check for stop strings, report the rows that ended, refill."""
            running = [slot for slot in range(slots) if slot_item[slot] >= 0 and taken[slot] == epoch[slot]]
            rows = []
            for slot in running:
                written, mark = data[slot][0], data[slot][1]
                new, start = tokens[slot], len(tokens[slot])
                if written > start:
                    new.extend(data[slot][4 + start - mark:4 + written - mark])
                eos_at = next((start + i for i, t in enumerate(new[start:]) if t in eos), None)
                rows.append((new[:eos_at + 1] if eos_at is not None else new, eos_at))
            stops = (stop_check([(slot_item[slot], new, checked[slot]) for slot, (new, _) in zip(running, rows)])
                     if stop_check is not None else [None] * len(running))
            free, finished = [], []
            for slot, (new, eos_at), stop in zip(running, rows, stops):
                if stop is not None and stop < len(new):
                    ended = (new[:stop + 1], "eos" if new[stop] in eos else "stop")
                elif eos_at is not None:
                    ended = (new, "eos")
                elif len(new) >= max_new_tokens:
                    ended = (new, "length")
                else:
                    checked[slot] = len(new)
                    continue
                results[slot_item[slot]] = ended
                finished.append((slot_item[slot], *ended))
                free.append(slot)
            if finished and on_finish is not None:
                on_finish(finished)
            if free:
                fill(free)

        with torch.inference_mode():
            st.done.fill_(True)
            fill(list(range(slots)))
            run = self._runner(st, steering, sampling, lambda kv: self._queue_step(st, steering, sampling, kv),
                               (st.tok, st.idx, st.nstep, st.out, st.done))
            # Pipelined (``queue_pipeline``): the host reads and checks one snapshot while the device decodes the
            # next window, so a row the host finds ended runs one window more before its slot is refilled (its
            # extra tokens are never read). Otherwise each window is read and checked before the next is queued.
            previous = None
            while True:
                current = launch()
                if not self.queue_pipeline:
                    if current is None:
                        break
                    process(absorb(current), current[1])
                    continue
                if previous is not None:
                    process(*previous)
                elif current is None:
                    break
                previous = None if current is None else (absorb(current), current[1])
        return results  # type: ignore[return-value]

    def _queue_snapshot(self, st: "_Queue", max_new: int, every: int):
        """Queue the copy to the host of each slot's (tokens written, columns read before, cache index, ended on
        the device, the up to ``every + 1`` tokens written since the last snapshot); returns (host buffer, event
        or None). Nothing here waits for the device."""
        written = st.nstep.clamp(max=max_new)
        cols = (st.mark[:, None] + torch.arange(every + 1, device=self.device)).clamp(max=max_new)
        rows = torch.cat([written[:, None], st.mark[:, None], st.idx, st.done[:, None].long(), st.out.gather(1, cols)],
                         dim=1)
        st.mark.copy_(written)
        if self.device.type != "cuda":
            return rows, None
        st.turn ^= 1
        host = st.host[st.turn]
        if host is None or host.shape != rows.shape:
            host = st.host[st.turn] = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
        host.copy_(rows, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    @staticmethod
    def _snapshot_rows(snapshot) -> list[list[int]]:
        host, event = snapshot
        if event is not None:
            event.synchronize()
        return host.tolist()

    def _queue_prefill(self, st: "_Queue", chosen: list[tuple[int, int]], prompts, keys, steering, deltas,
                       sampling: tuple, max_new: int) -> None:
        """Prefill the prompts of ``chosen`` (slot, prompt index) into their slots' cache rows (right padded,
        in row chunks within the scratch budget) and set each slot's first token, counters and steering;
        ``deltas`` holds each chosen prompt's (prompt delta, generated delta)."""

        lens = [len(prompts[item]) for _, item in chosen]
        t = max(lens)
        if self.attention == "flex":
            # Whole blocks: the compiled prefill is specialised on its block mask's length, so a length per
            # refill would recompile at almost every refill (each compile takes seconds); the padding is masked.
            t = min(-(-t // FLEX_BLOCK) * FLEX_BLOCK, st.valid.shape[1])
        ids = torch.full((len(chosen), t), self.pad_id, dtype=torch.long)
        for row, (_, item) in enumerate(chosen):
            ids[row, :lens[row]] = torch.as_tensor(list(prompts[item]), dtype=torch.long)
        ids = self._upload(ids)
        length = self._upload(torch.tensor(lens))
        slot_ids = self._upload(torch.tensor([slot for slot, _ in chosen]))
        prompt_delta = torch.stack([d for d, _ in deltas])[:, None]                 # (rows, 1, d_model)
        st.delta[slot_ids] = torch.stack([d for _, d in deltas])
        arange = torch.arange(t, device=self.device)
        valid = arange[None] < length[:, None]
        layer, site = (steering.layer, steering.site) if steering else (None, None)
        rows = max(1, int(PREFILL_SCRATCH_BYTES // (self.n_heads * t * t * 16)))
        shape = (min(rows, len(chosen)), self.n_kv, t, self.head_dim)
        scratch = ([torch.empty(shape, dtype=self.dtype, device=self.device) for _ in st.caches[0]],
                   [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in st.caches[1]])
        logits = []
        for r0 in range(0, len(chosen), rows):
            r = slice(r0, r0 + rows)
            m = ids[r].shape[0]
            caches = ([c[:m] for c in scratch[0]], [c[:m] for c in scratch[1]])
            logits.append(self._forward(ids[r], arange[None].expand(m, t), arange, self._prefill_masks(valid[r], t),
                                        caches, prompt_delta[r], layer, site, kv_len=t, last=length[r] - 1))
            for cache, part in zip((*st.caches[0], *st.caches[1]), (*caches[0], *caches[1])):
                cache[slot_ids[r], :, :t] = part
        if keys is not None:
            st.keys[slot_ids] = self._upload(torch.tensor([split_key(int(keys[item])) for _, item in chosen]))
        temperature, top_p, _ = sampling
        first = keyed_pick(torch.cat(logits), temperature, top_p, st.keys[slot_ids],
                           torch.zeros(1, dtype=torch.long, device=self.device))
        st.tok[slot_ids] = first[:, None]
        st.idx[slot_ids] = length[:, None]
        st.nstep[slot_ids] = 1
        st.out[slot_ids] = self.pad_id
        st.out[slot_ids, 0] = first
        st.done[slot_ids] = torch.isin(first, self.eos) | (max_new <= 1)
        st.mark[slot_ids] = 0

    def _upload(self, t):
        """``t`` on the device without waiting for it: a plain copy from pageable memory synchronises the stream,
        which would stall a pipelined queue's refill behind the window the device is decoding."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def _queue_step(self, st: "_Queue", steering: Steering | None, sampling: tuple, kv_len: int | None = None) -> None:
        """One decode step of every slot, each at its own index, attending to the first ``kv_len`` cache
        positions (graph-capturable). Finished rows keep their index (they write where nothing is read)."""

        max_len = st.valid.shape[1]
        max_new = st.out.shape[1] - 1
        masks = self._step_masks(st, st.idx[:, 0])
        layer, site = (steering.layer, steering.site) if steering else (None, None)
        logits = self._forward(st.tok, st.idx, st.idx, masks, st.caches, st.delta[:, None], layer, site,
                               fns=self._decode_fns, kv_len=kv_len)
        temperature, top_p, _ = sampling
        nxt = keyed_pick(logits, temperature, top_p, st.keys, st.nstep)
        nxt = torch.where(st.done, torch.full_like(nxt, self.pad_id), nxt)
        column = torch.where(st.done, torch.full_like(st.nstep, max_new), st.nstep.clamp(max=max_new))
        st.out.scatter_(1, column[:, None], nxt[:, None])
        st.nstep.add_(1)
        finished = st.done.clone()
        st.done |= torch.isin(nxt, self.eos) | (st.nstep >= max_new)
        st.tok.copy_(nxt[:, None])
        st.idx.copy_(torch.where(finished[:, None], st.idx, (st.idx + 1).clamp(max=max_len - 1)))

    def _queue_for(self, slots: int, max_len: int, max_new: int) -> "_Queue":
        key = ("queue", slots, max_len, max_new)
        if getattr(self, "_state_key", None) != key:
            self.release()                            # free the previous cache before allocating this one
            max_len = self._cache_length(max_len)
            shape = (slots, self.n_kv, max_len, self.head_dim)
            n = self.cfg.num_hidden_layers
            caches = ([torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)],
                      [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)])
            z = lambda *s, dt=torch.long: torch.zeros(s, dtype=dt, device=self.device)  # noqa: E731
            self._state = self._Queue(caches, torch.ones((slots, max_len), dtype=torch.bool, device=self.device),
                                      z(slots, 1), z(slots, 1), z(slots), z(slots, max_new + 1),
                                      torch.ones(slots, dtype=torch.bool, device=self.device), z(slots, 2),
                                      torch.zeros((slots, self.cfg.hidden_size), dtype=self.dtype, device=self.device),
                                      z(slots))
            self._state_key = key
            self._forget_graphs()
        return self._state

    def _delta(self, steering: Steering | None):
        if steering is None:
            return torch.zeros(self.cfg.hidden_size, dtype=self.dtype, device=self.device)
        d = torch.as_tensor(steering.direction).float()
        if d.shape != (self.cfg.hidden_size,):
            raise ValueError(f"steering direction has shape {tuple(d.shape)}, the model's d_model is "
                             f"{self.cfg.hidden_size}")
        if not 0 <= steering.layer < self.cfg.num_hidden_layers:
            raise IndexError(f"steering layer {steering.layer} out of range 0..{self.cfg.num_hidden_layers - 1}")
        return (steering.alpha * d).to(device=self.device, dtype=self.dtype)

    def _pick(self, logits, temperature: float, top_p: float, generator):
        """Greedy argmax, or a seeded sample with temperature and nucleus (top-p) filtering."""

        if temperature == 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(nucleus_scores(logits, temperature, top_p), dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    def release(self) -> None:
        """Free the KV cache and captured graphs (they are rebuilt on the next call)."""
        self._state, self._state_key = None, None
        self._forget_graphs()

    def _forget_graphs(self) -> None:
        """Drop the captured graphs and their memory pool. The pool is tied to its state by ``id``, which Python
        reuses once a state is freed: a new state must not inherit the pool of graphs that no longer exist (the
        CUDA allocator asserts when a graph is captured into a released pool)."""
        self._graphs, self._pool_state = {}, None

    def _state_for(self, b: int, max_len: int, max_new: int) -> "_State":
        # Buffers (and the graphs captured on them) are kept while consecutive batches share a shape.
        key = (b, max_len, max_new)
        current = getattr(self, "_state_key", None)
        if current != key:
            self._forget_graphs()                     # before the new state takes a (possibly reused) id
            self._state, self._state_key = self._allocate(b, max_len, max_new), key
        return self._state

