"""GPU benchmark suite: generation, activation capture, SAE encoding and statistics at real model shapes.

Randomly initialised Gemma-2 models of gemma-2-2b shape (and gemma-2-9b with ``--with-9b``; bf16,
eager attention; no hub access needed), prompts of ``--prompt-len`` random tokens, ``--new-tokens``
generated tokens (EOS disabled, so every row runs to the end). Each generation approach runs unsteered
and steered (``alpha * d`` at the middle layer, all positions):

  (a) thesis: one prompt at a time with transformers ``generate`` and no stop criteria
      (timed on ``--single-prompts`` prompts, reported per token);
  (b) hf-batched: transformers ``generate`` on a batch of ``--batch`` prompts;
  (c) pva-sae: the fast decoder (static KV cache, CUDA-graph decode step, steering in the graph),
      with eager layer math and with the decode step's layer math through torch.compile.

The roofline comes from this device, measured in the same run: device-to-device copy bandwidth
(bytes read + written per second) and the dense matmul rate in the model dtype. A decode step's limit
is max(bytes it must read / bandwidth, its FLOPs / matmul rate); a prefill's is its FLOPs / matmul rate
(attention counted causally). Every generation figure is reported with ``roofline``, the fraction of
that limit it reaches (1.0 = at the limit).

The realistic workload: the 974 MBPP prompts of ``pva_sae.data`` (the default template, tokenised with
the embedded default's tokenizer), each stopping after a completion length drawn from a fixed seeded
log-normal distribution (median ~90 tokens, capped at ``--workload-max-new``), as base models stop after
the solution. Static batching (the plan of ``generate_batch``: sorted by length, batches of
``--batch``, a row budget per batch) against continuous batching (``generate_queue``, ``--batch``
slots), total time against that workload's roofline.

Then: residual capture at the last prompt token for ``--capture-prompts`` prompts at every layer
(pva_sae.capture), encoding those with one random 16k JumpReLU SAE per layer (float32), and the
SAE-analysis statistics (pva_sae.stats) on the encoded latents.

Prints a markdown table and writes JSON (``--out``, under docs/ by default). On a GPU machine:

    python scripts/bench_gpu.py                 # 2b, ~4 minutes on one H200
    python scripts/bench_gpu.py --with-9b       # and 9b

``--toy`` runs every part at a toy shape on the CPU (seconds; a smoke test of the script).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

SHAPES = {
    "2b": dict(num_hidden_layers=26, hidden_size=2304, intermediate_size=9216, num_attention_heads=8,
               num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256),
    "9b": dict(num_hidden_layers=42, hidden_size=3584, intermediate_size=14336, num_attention_heads=16,
               num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256),
}
TOY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
           head_dim=16, query_pre_attn_scalar=16)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="2b", help="comma-separated model shapes: 2b, 9b")
    p.add_argument("--with-9b", action="store_true", help="add the 9b shape")
    p.add_argument("--toy", action="store_true", help="toy shape and sizes on the CPU (a smoke test)")
    p.add_argument("--workload-prompts", type=int, default=974, help="MBPP prompts of the realistic workload")
    p.add_argument("--workload-max-new", type=int, default=384)
    p.add_argument("--workload-attention", default="eager,flex",
                   help="attention implementations the workload runs with (flex: CUDA only, compiled)")
    p.add_argument("--workload-batch-tokens", type=int, default=256 * 1024,
                   help="static batching: rows x (longest prompt + max new) cap per batch (as generation."
                        "max_batch_tokens), so the few very long prompts get small batches")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=200)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--single-prompts", type=int, default=3, help="prompts timed one at a time for (a)")
    p.add_argument("--capture-prompts", type=int, default=974)
    p.add_argument("--capture-batch", type=int, default=64)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--skip", default="",
                   help="comma-separated parts to skip: thesis,hf,fast,compiled,workload,capture,sae")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default docs/bench_gpu_<device>_<date>.json)")
    args = p.parse_args(argv)
    if args.with_9b and "9b" not in args.shapes.split(","):
        args.shapes += ",9b"
    if args.toy:
        args.shapes, args.batch, args.prompt_len, args.new_tokens = "toy", 4, 12, 8
        args.single_prompts, args.capture_prompts, args.capture_batch, args.d_sae = 1, 8, 4, 64
        args.workload_prompts, args.workload_max_new, args.workload_batch_tokens = 12, 24, 4 * 64
    return args


DEVICE = "cuda"


def random_model(shape: str):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    toy = shape == "toy"
    cfg = Gemma2Config(vocab_size=512 if toy else 256000, max_position_embeddings=8192,
                       sliding_window=16 if toy else 4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                       **(TOY if toy else SHAPES[shape]))
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = Gemma2ForCausalLM._from_config(cfg, attn_implementation="eager",
                                               dtype=torch.float32 if DEVICE == "cpu" else torch.bfloat16)
    model.eval()
    return model


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    sync()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    sync()
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0
    return out, time.perf_counter() - start, peak


# --------------------------------------------------------------------------- roofline of this device

def measure_device(dtype) -> dict:
    """Copy bandwidth (bytes read + written per second, device to device) and dense matmul rate in ``dtype``."""

    big = DEVICE == "cuda"
    n_bytes = (2 << 30) if big else (64 << 20)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    reps = 20 if big else 3
    _, t, _ = timed(lambda: [dst.copy_(src) for _ in range(reps)])
    bandwidth = 2 * n_bytes * reps / t
    src = dst = None  # noqa: F841 (frees 4 GiB before the matmul)
    n = 8192 if big else 512
    a = torch.randn(n, n, dtype=dtype, device=DEVICE)
    b = torch.randn(n, n, dtype=dtype, device=DEVICE)
    a @ b
    reps = 20 if big else 3
    _, t, _ = timed(lambda: [a @ b for _ in range(reps)])
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return {"copy_bandwidth_bytes_per_s": bandwidth, "matmul_flops_per_s": 2 * n ** 3 * reps / t,
            "matmul_n": n, "matmul_dtype": str(dtype).replace("torch.", "")}


class Roofline:
    """Time limits of the model's prefill and decode on the measured device."""

    def __init__(self, model, device: dict):
        cfg = model.config
        self.cfg = cfg
        self.bw, self.flops = device["copy_bandwidth_bytes_per_s"], device["matmul_flops_per_s"]
        item = next(model.parameters()).element_size()
        self.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        embed = cfg.vocab_size * cfg.hidden_size
        self.body_params = sum(p.numel() for p in model.parameters()) - embed      # tied unembedding not counted
        self.embed_params = embed
        self.kv_bytes_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * item
        self.attn = cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim

    def prefill_s(self, prompt_lens) -> float:
        """FLOPs of prefilling prompts of these lengths (last-position logits only) over the matmul rate."""
        tokens = sum(prompt_lens)
        flops = 2 * self.body_params * tokens + 2 * self.embed_params * len(prompt_lens)
        flops += sum(2 * self.attn * t * t for t in prompt_lens)                  # QK^T and PV, causal half
        return flops / self.flops

    def decode_step_s(self, rows: int, context_tokens: float) -> float:
        """One step of ``rows`` rows attending over ``context_tokens`` cached tokens in all (summed over rows)."""
        memory = (self.weight_bytes + context_tokens * self.kv_bytes_per_token) / self.bw
        compute = (2 * (self.body_params + self.embed_params) * rows + 4 * self.attn * context_tokens) / self.flops
        return max(memory, compute)

    def generation_s(self, rows: int, prompt_len: int, new_tokens: int) -> tuple[float, float, float]:
        """(prefill, decode, total) limit of a static batch: all rows prompt_len long, new_tokens each."""
        prefill = self.prefill_s([prompt_len] * rows)
        decode = sum(self.decode_step_s(rows, rows * (prompt_len + t)) for t in range(1, new_tokens))
        return prefill, decode, prefill + decode


def steering_for(model, alpha: float):
    from pva_sae.model.fastgen import Steering

    d = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    return Steering(model.config.num_hidden_layers // 2, d / d.norm(), alpha)


def hf_generate(model, ids, new_tokens: int, steering):
    from transformers import GenerationConfig

    from pva_sae.model.generation import _steering_hook

    gc = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                          eos_token_id=None, pad_token_id=0)
    with torch.inference_mode(), _steering_hook(model, steering):
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc)


def bench_generation(model, args, shape: str, roof: Roofline) -> list[dict]:
    from pva_sae.model.fastgen import StaticDecoder

    rows = []
    g = torch.Generator(device=DEVICE).manual_seed(1)
    ids = torch.randint(10, model.config.vocab_size, (args.batch, args.prompt_len), device=DEVICE, generator=g)
    skip = set(args.skip.split(","))
    decoders = {"fast": StaticDecoder(model, eos_ids=[-1], pad_id=0)}
    one = roof.generation_s(1, args.prompt_len, args.new_tokens)[2]
    batch_pre, batch_dec, batch_all = roof.generation_s(args.batch, args.prompt_len, args.new_tokens)
    if "compiled" not in skip and DEVICE == "cuda":
        decoders["compiled"] = StaticDecoder(model, eos_ids=[-1], pad_id=0, compile=True)
    if "flex" not in skip and DEVICE == "cuda":
        decoders["flex"] = StaticDecoder(model, eos_ids=[-1], pad_id=0, compile=True, attention="flex")
    # Approach by approach (both steering settings each), so that HF's cache is freed before the
    # fast decoder allocates its static one.
    for approach in ("thesis", "hf", "fast", "compiled", "flex"):
        if approach in skip:
            continue
        for steered in (False, True):
            steering = steering_for(model, args.alpha) if steered else None
            tag = "steered" if steered else "plain"
            if approach == "thesis":
                hf_generate(model, ids[:1], 4, steering)                                  # warm-up
                _, t, mem = timed(lambda: [hf_generate(model, ids[i:i + 1], args.new_tokens, steering)
                                           for i in range(args.single_prompts)])
                n = args.single_prompts * args.new_tokens
                rows.append(dict(shape=shape, approach="(a) thesis: one at a time, HF generate", steering=tag,
                                 batch=1, tokens_per_s=n / t, ms_per_step=1000 * t / n, peak_gib=mem,
                                 roofline=one * args.single_prompts / t))
            elif approach == "hf":
                hf_generate(model, ids[:8], 4, steering)
                _, t, mem = timed(lambda: hf_generate(model, ids, args.new_tokens, steering))
                rows.append(dict(shape=shape, approach="(b) HF batched generate", steering=tag, batch=args.batch,
                                 tokens_per_s=args.batch * args.new_tokens / t,
                                 ms_per_step=1000 * t / args.new_tokens, peak_gib=mem, roofline=batch_all / t))
            elif approach in decoders:
                decoder = decoders[approach]
                mask = torch.ones_like(ids)
                try:
                    decoder.generate(ids, mask, args.new_tokens, steering=steering)  # captures the graph
                except Exception as error:  # one failing variant (a kernel that does not lower) keeps the others
                    rows.append(dict(shape=shape, approach=f"(c) {approach}: FAILED", steering=tag,
                                     error=f"{type(error).__name__}: {str(error)[:300]}"))
                    print(f"{approach} {tag} failed: {type(error).__name__}: {str(error)[:2000]}", flush=True)
                    continue
                out, t, mem = timed(lambda: decoder.generate(ids, mask, args.new_tokens, steering=steering))
                assert out.shape[1] == args.prompt_len + args.new_tokens
                _, t_prefill, _ = timed(lambda: decoder.generate(ids, mask, 1, steering=steering))
                name = "(c) pva-sae fast decoder" + {"fast": "", "compiled": " + torch.compile",
                                                     "flex": " + torch.compile + FlexAttention"}[approach]
                rows.append(dict(shape=shape, approach=name, steering=tag, batch=args.batch,
                                 tokens_per_s=args.batch * args.new_tokens / t,
                                 ms_per_step=1000 * t / args.new_tokens, peak_gib=mem, roofline=batch_all / t,
                                 prefill_s=t_prefill, prefill_roofline=batch_pre / t_prefill,
                                 decode_ms_per_step=1000 * (t - t_prefill) / (args.new_tokens - 1),
                                 decode_roofline=batch_dec / max(t - t_prefill, 1e-9),
                                 limit_decode_ms_per_step=1000 * batch_dec / (args.new_tokens - 1),
                                 limit_prefill_s=batch_pre))
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        if approach in decoders:
            decoders[approach].release()                                           # free its KV cache
    if "hf" not in skip:
        small = ids[:16]
        want = hf_generate(model, small, 32, None).cpu()
        for name, decoder in decoders.items():
            got = decoder.generate(small, torch.ones_like(small), 32)
            rows.append(dict(shape=shape, approach=f"check: {name} == HF greedy ({len(small)} prompts x 32 tokens)",
                             identical_rows=int((want == got).all(dim=1).sum()), rows=len(small)))
    del decoders
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return rows


class IdTokenizer:
    """Prompts written as space-separated token ids (for capture without a real tokenizer)."""

    pad_token_id, eos_token_id, bos_token_id = 0, 1, 2

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[int(t) for t in text.split()] for text in texts]}


def bench_analysis(model, args, shape: str) -> list[dict]:
    from pva_sae.model.capture import capture_last_token
    from pva_sae.sae.jumprelu import JumpReLUSAE
    from pva_sae.stats.latents import score_layer

    rows, skip = [], set(args.skip.split(","))
    n_layers, d = model.config.num_hidden_layers, model.config.hidden_size
    g = torch.Generator().manual_seed(2)
    vocab = model.config.vocab_size
    prompts = [" ".join(str(int(t)) for t in torch.randint(10, vocab, (args.prompt_len,), generator=g))
               for _ in range(args.capture_prompts)]
    if "capture" in skip:
        return rows
    capture_last_token(model, IdTokenizer(), prompts[:args.capture_batch], batch_size=args.capture_batch,
                       progress=False)
    acts, t, mem = timed(lambda: capture_last_token(model, IdTokenizer(), prompts, batch_size=args.capture_batch,
                                                    progress=False))
    rows.append(dict(shape=shape, approach=f"capture: {args.capture_prompts} prompts x {n_layers} layers",
                     seconds=t, peak_gib=mem))
    if "sae" in skip:
        return rows
    saes = []
    for layer in range(n_layers):
        w = torch.randn(args.d_sae, d, device=DEVICE) / d ** 0.5
        saes.append(JumpReLUSAE(w.T.contiguous(), w, torch.zeros(args.d_sae, device=DEVICE),
                                torch.zeros(d, device=DEVICE), torch.full((args.d_sae,), 0.5, device=DEVICE)))
    x = acts.to(DEVICE)                                                      # (n, layers, d)
    labels = torch.rand(x.shape[0], device=DEVICE) < 0.3
    saes[0].encode(x[:, 0])
    latents, t, mem = timed(lambda: [sae.encode(x[:, i]) for i, sae in enumerate(saes)])
    rows.append(dict(shape=shape, approach=f"encode: {n_layers} SAEs x {args.d_sae} latents (float32)",
                     seconds=t, peak_gib=mem))
    _, t, mem = timed(lambda: [score_layer(z, labels) for z in latents])
    rows.append(dict(shape=shape, approach="statistics: frequencies, separation, Welch t, all layers",
                     seconds=t, peak_gib=mem))
    return rows


# --------------------------------------------------------------------------- realistic workload

def workload(args) -> tuple[list[list[int]], list[int]]:
    """The MBPP prompts (default template) as token ids of the embedded default's tokenizer, and the completion
    length each stops at: log-normal, median 90 tokens, sigma 0.6, within [8, workload_max_new], seed 0."""
    from importlib.resources import files

    from transformers import AutoTokenizer

    from pva_sae.data import mbpp, prompts

    tokenizer = AutoTokenizer.from_pretrained(str(files("pva_sae") / "assets" / "default" / "model"))
    tasks = mbpp.load_tasks("packaged")[:args.workload_prompts]
    ids = [tokenizer(prompts.build_prompt(t))["input_ids"] for t in tasks]
    g = torch.Generator().manual_seed(0)
    lengths = torch.exp(torch.randn(len(ids), generator=g) * 0.6 + torch.log(torch.tensor(90.0)))
    return ids, lengths.round().clamp(8, args.workload_max_new).long().tolist()


def workload_roofline(roof: Roofline, ids, lengths, slots: int) -> float:
    """Prefill FLOPs of every prompt plus decode: every generated token's KV reads, and the weights once per
    step of ``slots`` rows (the fewest steps that produce all tokens), each step at max(memory, compute)."""
    contexts = [len(p) + t for p, n in zip(ids, lengths) for t in range(1, n)]
    steps = -(-len(contexts) // slots)
    per_step = sum(contexts) / steps
    decode = steps * roof.decode_step_s(min(slots, len(contexts)), per_step)
    return roof.prefill_s([len(p) for p in ids]) + decode


def bench_workload(model, args, shape: str, roof: Roofline) -> list[dict]:
    """Static batching (plan of generate_batch) vs continuous batching on the MBPP workload, greedy, no EOS."""
    from pva_sae.model.fastgen import StaticDecoder

    ids, lengths = workload(args)
    vocab = model.config.vocab_size
    ids = [[t % vocab for t in p] for p in ids]
    useful = sum(lengths)
    limit = workload_roofline(roof, ids, lengths, args.batch)
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))               # as plan_batches
    batches, current, longest = [], [], 0
    for i in order:
        width = max(longest, len(ids[i])) + args.workload_max_new
        if current and (len(current) == args.batch or (len(current) + 1) * width > args.workload_batch_tokens):
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, len(ids[i]))
    batches.append(current)

    def static(decoder):
        decoded = 0
        for batch in batches:
            p = max(len(ids[i]) for i in batch)
            x = torch.zeros((len(batch), p), dtype=torch.long)
            mask = torch.zeros_like(x)
            for r, i in enumerate(batch):
                x[r, p - len(ids[i]):] = torch.tensor(ids[i])
                mask[r, p - len(ids[i]):] = 1
            want = torch.tensor([lengths[i] for i in batch])
            out = decoder.generate(x, mask, args.workload_max_new,
                                   stop_check=lambda out, plen, done: done | (out.shape[1] - plen >= want))
            decoded += len(batch) * (out.shape[1] - p)
        return decoded

    def continuous(decoder):
        stop = lambda reqs: [lengths[i] - 1 if len(new) >= lengths[i] else None for i, new, _ in reqs]  # noqa: E731
        out = decoder.generate_queue(ids, args.workload_max_new, args.batch, stop_check=stop)
        assert [len(t) for t, _ in out] == lengths
        return sum(len(t) for t, _ in out)

    rows = []
    attentions = [a for a in args.workload_attention.split(",") if a == "eager" or DEVICE == "cuda"]
    for attention in attentions:
        decoder = StaticDecoder(model, eos_ids=[-1], pad_id=0, compile=attention == "flex", attention=attention)
        for name, run in (("static batching (generate_batch plan)", static),
                          ("continuous batching (generate_queue)", continuous)):
            try:
                run(decoder)                                                     # warm-up, graph capture
            except Exception as error:  # reported, and the other variants still run
                rows.append(dict(shape=shape, approach=f"workload: {name}, {attention} attention: FAILED",
                                 error=f"{type(error).__name__}: {str(error)[:300]}"))
                print(f"workload {name} {attention} failed: {type(error).__name__}: {str(error)[:2000]}", flush=True)
                decoder.release()
                continue
            decoded, t, mem = timed(lambda: run(decoder))
            rows.append(dict(shape=shape, approach=f"workload: {name}, {attention} attention", prompts=len(ids),
                             batch=args.batch, useful_tokens=useful, decoded_row_steps=decoded, seconds=t,
                             tokens_per_s=useful / t, peak_gib=mem, roofline=limit / t, limit_s=limit))
            decoder.release()
    return rows


def fraction(r: dict, key: str = "roofline") -> str:
    return f"{r[key]:.0%}" if key in r else ""


def table(rows: list[dict]) -> str:
    lines = ["| shape | approach | steering | batch | tokens/s | ms/step | of roofline | peak GiB | vs (a) | vs (b) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['approach']} ({r['error'][:120]}) | {r.get('steering', '')} | | | | | | | |")
            continue
        if r["approach"].startswith("workload"):
            lines.append(f"| {r['shape']} | {r['approach']}: {r['prompts']} prompts, {r['useful_tokens']:,} tokens in "
                         f"{r['seconds']:.2f} s (limit {r['limit_s']:.2f} s) | | {r['batch']} | "
                         f"{r['tokens_per_s']:,.0f} | | {fraction(r)} | {r['peak_gib']:.1f} | | |")
            continue
        if "tokens_per_s" not in r:
            extra = (f"{r['identical_rows']}/{r['rows']} identical" if "rows" in r else f"{r['seconds']:.3f} s")
            lines.append(f"| {r['shape']} | {r['approach']} | | | {extra} | | | {r.get('peak_gib', 0):.1f} | | |")
            continue
        base = {k: next((x for x in rows if x["shape"] == r["shape"] and x.get("steering") == r["steering"]
                         and x["approach"].startswith(k)), None) for k in ("(a)", "(b)")}
        ratio = {k: (f"{r['tokens_per_s'] / b['tokens_per_s']:.1f}x" if b else "") for k, b in base.items()}
        lines.append(f"| {r['shape']} | {r['approach']} | {r['steering']} | {r['batch']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['ms_per_step']:.2f} | {fraction(r)} | {r['peak_gib']:.1f} | {ratio['(a)']} | "
                     f"{ratio['(b)']} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    global DEVICE
    args = parse_args(argv)
    DEVICE = "cpu" if args.toy else "cuda"
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --toy for the CPU smoke test")
    import transformers

    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    now = datetime.datetime.now(datetime.UTC)
    if args.out is None:
        tag = "toy" if args.toy else name.split()[-1].lower()
        args.out = Path(__file__).resolve().parent.parent / "docs" / f"bench_gpu_{tag}_{now:%Y-%m-%d}.json"
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    results = {"date": now.isoformat(timespec="seconds"), "device": name, "torch": torch.__version__,
               "transformers": transformers.__version__, "python": platform.python_version(),
               "args": vars(args) | {"out": str(args.out)}, "device_measured": measure_device(dtype),
               "rows": [], "limits": {}}
    dev = results["device_measured"]
    skip = set(args.skip.split(","))
    for shape in args.shapes.split(","):
        model = random_model(shape)
        roof = Roofline(model, dev)
        pre, dec, total = roof.generation_s(args.batch, args.prompt_len, args.new_tokens)
        results["limits"][shape] = {"weights_gb": roof.weight_bytes / 1e9, "prefill_s": pre,
                                    "decode_ms_per_step": 1000 * dec / max(args.new_tokens - 1, 1),
                                    "end_to_end_tokens_per_s": args.batch * args.new_tokens / total}
        results["rows"] += bench_generation(model, args, shape, roof)
        if "workload" not in skip:
            results["rows"] += bench_workload(model, args, shape, roof)
        results["rows"] += bench_analysis(model, args, shape)
        del model
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    print(f"{results['device']}, torch {results['torch']}, transformers {results['transformers']}, {results['date']}")
    print(f"measured: copy {dev['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s, {dev['matmul_dtype']} matmul "
          f"{dev['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s; prompts {args.prompt_len} tokens, {args.new_tokens} new "
          f"tokens, batch {args.batch}")
    print(table(results["rows"]))
    for r in results["rows"]:
        if "decode_ms_per_step" in r:
            print(f"{r['shape']} {r['approach']} {r['steering']}: prefill {r['prefill_s']:.3f} s "
                  f"({fraction(r, 'prefill_roofline')} of {r['limit_prefill_s']:.3f} s), decode "
                  f"{r['decode_ms_per_step']:.2f} ms/step ({fraction(r, 'decode_roofline')} of "
                  f"{r['limit_decode_ms_per_step']:.2f}; {args.batch / r['decode_ms_per_step'] * 1e3:,.0f} tokens/s)")
    for shape, hl in results["limits"].items():
        print(f"{shape} roofline at batch {args.batch}: prefill {hl['prefill_s']:.3f} s, decode "
              f"{hl['decode_ms_per_step']:.2f} ms/step, end to end {hl['end_to_end_tokens_per_s']:,.0f} tokens/s")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
