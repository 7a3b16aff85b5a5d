"""Fast batched decoding for Gemma-2: static KV cache, CUDA-graph decode step, steering inside the graph.

Hugging Face ``generate`` spends ~33 ms per decode step on a gemma-2-2b-shaped model whatever the
batch (kernel-launch and Python overhead; the arithmetic of a step at batch 256 takes ~2 ms on an
H100). This module runs the same network with the model's own weights (no copy) through a lean
forward:

- the KV cache is preallocated, (batch, kv_heads, max_len, head_dim) per layer; a step writes its
  keys and values at a position held in a device tensor, so every step has the same shapes;
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
graph on the graph's logits with a seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

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


PREFILL_SCRATCH_BYTES = 2 << 30  # attention scratch per prefill chunk: rows are prefilled in chunks within it


def free_memory_batch_size(model: Any, max_len: int, budget_fraction: float = 0.8, cap: int = 256) -> int:
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
    h = h + _rms(F.linear(o, w[5]), w[4], eps)
    x = _rms(h, w[6], eps)
    x = F.linear(F.gelu(F.linear(x, w[7]), approximate="tanh") * F.linear(x, w[8]), w[9])
    return h + _rms(x, w[10], eps)


def _head(h, gain, eps: float, w_out, cap):
    """Final norm, unembedding, logit soft-capping; float32 logits (B, vocab)."""

    logits = F.linear(_rms(h, gain, eps), w_out)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


class StaticDecoder:
    """Greedy or sampled decoding of a loaded ``Gemma2ForCausalLM`` (see the module docstring)."""

    def __init__(self, model: Any, eos_ids: Sequence[int], pad_id: int, check_every: int = 16,
                 use_cuda_graph: bool | None = None, compile: bool = False):

        if not supports(model):
            raise FastGenError(f"the fast decoder implements Gemma-2 only, not {model.config.model_type!r}; "
                               "use generation.backend='hf'")
        cfg = model.config
        if getattr(cfg, "rope_parameters", {}).get("rope_type", "default") != "default":
            raise FastGenError("the fast decoder supports default RoPE only; use generation.backend='hf'")
        self.model, self.cfg = model, cfg
        self.inner = model.model
        self.device = next(model.parameters()).device
        self.dtype = self.inner.embed_tokens.weight.dtype
        self.eos = torch.tensor(sorted(set(int(e) for e in eos_ids)), device=self.device)
        self.pad_id = int(pad_id)
        self.check_every = check_every
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
        qkv, rest = (fns or (_qkv, _attend_mlp))[:2]
        w = self._weights[i]
        q, k, v = qkv(h, w, cos, sin, self.eps, self.n_heads, self.n_kv, self.head_dim)
        keys.index_copy_(2, write_at, k)       # cache writes stay outside compiled code (no copy-back)
        values.index_copy_(2, write_at, v)
        if kv_len is not None:
            keys, values = keys[:, :, :kv_len], values[:, :, :kv_len]
        return rest(h, q, keys, values, mask[i], w, self.eps, self.scaling, self.cfg.attn_logit_softcapping,
                    self.n_heads, self.n_kv, self.head_dim)

    def _forward(self, tokens, positions, write_at, mask, caches, delta, steer_layer, steer_site,
                 kv_len: int | None = None, fns=None):
        """Logits of the last position (B, vocab) float32; tokens/positions (B, T)."""
        h = self.inner.embed_tokens(tokens)                    # the module multiplies by sqrt(d_model)
        cos, sin = self._rope(positions)
        for i in range(self.cfg.num_hidden_layers):
            if i == steer_layer and steer_site == "resid_pre":
                h = h + delta
            h = self._layer(i, h, cos, sin, caches[0][i], caches[1][i], write_at, mask, kv_len, fns)
            if i == steer_layer and steer_site == "resid_post":
                h = h + delta
        head = fns[2] if fns else _head
        return head(h[:, -1], self._gain[id(self.inner.norm)], self.eps, self.model.lm_head.weight,
                    self.cfg.final_logit_softcapping)

    def _masks(self, valid, query_pos, max_len: int):
        """Per layer (B, 1, T, L) bool: key is a real token, not in the future, and inside the sliding window."""

        kpos = torch.arange(max_len, device=self.device)
        causal = kpos[None, :] <= query_pos[:, None]                                   # (T, L)
        base = valid[:, None, None, :] & causal[None, None]
        window = self.cfg.sliding_window
        if window is None:
            return [base] * len(self.sliding)
        slide = base & (kpos[None, :] > query_pos[:, None] - window)[None, None]
        return [slide if s else base for s in self.sliding]

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

    def _allocate(self, b: int, max_len: int, max_new: int) -> "_State":
        shape = (b, self.n_kv, max_len, self.head_dim)
        n = self.cfg.num_hidden_layers
        caches = ([torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)],
                  [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)])
        z = lambda *s, dt=torch.long: torch.zeros(s, dtype=dt, device=self.device)  # noqa: E731
        return self._State(caches, z(b, max_len, dt=torch.bool), z(b, 1), z(b, 1), z(1), z(1),
                           torch.full((b, max_new), self.pad_id, dtype=torch.long, device=self.device),
                           z(b, dt=torch.bool), torch.zeros(self.cfg.hidden_size, dtype=self.dtype, device=self.device),
                           torch.zeros((b, self.cfg.vocab_size), dtype=torch.float32, device=self.device))

    def _decode_step(self, st: "_State", steering: Steering | None, greedy: bool) -> None:
        """One decode step on the state's buffers (graph-capturable: no host sync, fixed shapes)."""
        max_len = st.valid.shape[1]
        masks = self._masks(st.valid, st.idx, max_len)
        layer, site = (steering.layer, steering.site) if steering else (None, None)
        logits = self._forward(st.tok, st.pos, st.idx, masks, st.caches, st.delta, layer, site,
                               fns=self._decode_fns)
        if greedy:
            self._advance(st, logits.argmax(dim=-1))
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

    def _graph(self, st: "_State", steering: Steering | None, greedy: bool):
        key = (id(st), steering.layer if steering else None, steering.site if steering else None, greedy)
        if key in self._graphs:
            return self._graphs[key]
        saved = [t.clone() for t in (st.tok, st.pos, st.idx, st.step, st.out, st.done)]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):                        # warm-up (allocator, cuBLAS workspaces)
                self._decode_step(st, steering, greedy)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._decode_step(st, steering, greedy)
        for t, s in zip((st.tok, st.pos, st.idx, st.step, st.out, st.done), saved):
            t.copy_(s)                                # undo the warm-up and capture steps
        self._graphs = {k: v for k, v in self._graphs.items() if k[0] == id(st)}
        self._graphs[key] = graph
        return graph

    def generate(self, input_ids, attention_mask, max_new_tokens: int, *, steering: Steering | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, generator=None, stop_check=None) -> "torch.Tensor":
        """(B, P + T) token ids laid out like ``generate``'s: prompt, new tokens, padding after each row's end.

        ``stop_check(out, prompt_len, done) -> done`` (on CPU tensors) marks rows whose text hit a stop
        string; it is called every ``check_every`` steps. ``input_ids`` must be LEFT padded.
        """

        b, p = input_ids.shape
        max_len = p + max_new_tokens
        st = self._state_for(b, max_len, max_new_tokens)
        greedy = temperature == 0
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
            st.tok.copy_(self._pick(logits, temperature, top_p, generator)[:, None])
            st.out[:, 0] = torch.where(st.done, self.pad_id, st.tok[:, 0])
            st.done |= torch.isin(st.tok[:, 0], self.eos)
            st.pos.copy_(positions[:, -1:] + 1)
            st.idx.fill_(p)
            st.step.fill_(1)
            graph = self._graph(st, steering, greedy) if self.use_graph and max_new_tokens > 1 else None
            steps = 1
            while steps < max_new_tokens:
                for _ in range(min(self.check_every, max_new_tokens - steps)):
                    if graph is not None:
                        graph.replay()
                    else:
                        self._decode_step(st, steering, greedy)
                    if not greedy:
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
        masks = self._masks(st.valid, arange, st.valid.shape[1])
        layer, site = (steering.layer, steering.site) if steering else (None, None)
        rows = max(1, int(PREFILL_SCRATCH_BYTES // (self.n_heads * p * p * 16)))
        out = []
        for r0 in range(0, b, rows):
            r = slice(r0, r0 + rows)
            caches = ([c[r] for c in st.caches[0]], [c[r] for c in st.caches[1]])
            out.append(self._forward(input_ids[r], positions[r], arange, [m[r] for m in masks], caches, st.delta,
                                     layer, site, kv_len=p))
        return torch.cat(out)

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
        scores = logits / temperature
        if top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            remove = cum <= (1 - top_p)
            remove[..., -1:] = False
            scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    def release(self) -> None:
        """Free the KV cache and captured graphs (they are rebuilt on the next call)."""
        self._state, self._state_key, self._graphs = None, None, {}

    def _state_for(self, b: int, max_len: int, max_new: int) -> "_State":
        # Buffers (and the graphs captured on them) are kept while consecutive batches share a shape.
        key = (b, max_len, max_new)
        current = getattr(self, "_state_key", None)
        if current != key:
            self._state, self._state_key = self._allocate(b, max_len, max_new), key
            self._graphs = {}
        return self._state

