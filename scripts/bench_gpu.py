"""GPU benchmark suite: generation, activation capture, SAE encoding and statistics at real model shapes.

Randomly initialised Gemma-2 models of gemma-2-2b and gemma-2-9b shape (bf16, eager attention; no
hub access needed), prompts of ``--prompt-len`` random tokens, ``--new-tokens`` generated tokens
(EOS disabled, so every row runs to the end). Each generation approach runs unsteered and steered
(``alpha * d`` at the middle layer, all positions):

  (a) thesis: one prompt at a time with transformers ``generate`` and no stop criteria
      (timed on ``--single-prompts`` prompts, reported per token);
  (b) hf-batched: transformers ``generate`` on a batch of ``--batch`` prompts;
  (c) pva-sae: the fast decoder (static KV cache, CUDA-graph decode step, steering in the graph),
      with eager layer math and with the decode step's layer math through torch.compile.

Then: residual capture at the last prompt token for ``--capture-prompts`` prompts at every layer
(pva_sae.capture), encoding those with one random 16k JumpReLU SAE per layer (float32), and the
SAE-analysis statistics (pva_sae.stats) on the encoded latents.

Prints a markdown table and writes JSON (``--out``). Usage on a GPU machine:

    python scripts/bench_gpu.py --shapes 2b,9b --out bench_gpu.json
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
H100_BANDWIDTH_TBS = 3.35


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="2b,9b")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=200)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--single-prompts", type=int, default=3, help="prompts timed one at a time for (a)")
    p.add_argument("--capture-prompts", type=int, default=974)
    p.add_argument("--capture-batch", type=int, default=64)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: thesis,hf,fast,compiled,capture,sae")
    p.add_argument("--out", type=Path, default=Path("bench_gpu.json"))
    return p.parse_args()


def random_model(shape: str):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=256000, max_position_embeddings=8192, sliding_window=4096,
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Gemma2ForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.bfloat16)
    model.eval()
    return model


def timed(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30


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


def bench_generation(model, args, shape: str) -> list[dict]:
    from pva_sae.model.fastgen import StaticDecoder

    rows = []
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(10, model.config.vocab_size, (args.batch, args.prompt_len), device="cuda", generator=g)
    skip = set(args.skip.split(","))
    decoders = {"fast": StaticDecoder(model, eos_ids=[-1], pad_id=0)}
    if "compiled" not in skip:
        decoders["compiled"] = StaticDecoder(model, eos_ids=[-1], pad_id=0, compile=True)
    # Approach by approach (both steering settings each), so that HF's cache is freed before the
    # fast decoder allocates its static one.
    for approach in ("thesis", "hf", "fast", "compiled"):
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
                                 batch=1, tokens_per_s=n / t, ms_per_step=1000 * t / n, peak_gib=mem))
            elif approach == "hf":
                hf_generate(model, ids[:8], 4, steering)
                _, t, mem = timed(lambda: hf_generate(model, ids, args.new_tokens, steering))
                rows.append(dict(shape=shape, approach="(b) HF batched generate", steering=tag, batch=args.batch,
                                 tokens_per_s=args.batch * args.new_tokens / t,
                                 ms_per_step=1000 * t / args.new_tokens, peak_gib=mem))
            elif approach in decoders:
                decoder = decoders[approach]
                mask = torch.ones_like(ids)
                decoder.generate(ids, mask, args.new_tokens, steering=steering)      # captures the graph
                out, t, mem = timed(lambda: decoder.generate(ids, mask, args.new_tokens, steering=steering))
                assert out.shape[1] == args.prompt_len + args.new_tokens
                _, t_prefill, _ = timed(lambda: decoder.generate(ids, mask, 1, steering=steering))
                name = "(c) pva-sae fast decoder" + (" + torch.compile" if approach == "compiled" else "")
                rows.append(dict(shape=shape, approach=name, steering=tag, batch=args.batch,
                                 tokens_per_s=args.batch * args.new_tokens / t,
                                 ms_per_step=1000 * t / args.new_tokens, peak_gib=mem,
                                 prefill_s=t_prefill, decode_ms_per_step=1000 * (t - t_prefill) / (args.new_tokens - 1)))
            torch.cuda.empty_cache()
        if approach in decoders:
            decoders[approach].release()                                           # free its KV cache
    if "hf" not in skip:
        small = ids[:16]
        want = hf_generate(model, small, 32, None).cpu()
        for name, decoder in decoders.items():
            got = decoder.generate(small, torch.ones_like(small), 32)
            rows.append(dict(shape=shape, approach=f"check: {name} == HF greedy (16 prompts x 32 tokens)",
                             identical_rows=int((want == got).all(dim=1).sum()), rows=16))
    del decoders
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
    prompts = [" ".join(str(int(t)) for t in torch.randint(10, 256000, (args.prompt_len,), generator=g))
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
        w = torch.randn(args.d_sae, d, device="cuda") / d ** 0.5
        saes.append(JumpReLUSAE(w.T.contiguous(), w, torch.zeros(args.d_sae, device="cuda"),
                                torch.zeros(d, device="cuda"), torch.full((args.d_sae,), 0.5, device="cuda")))
    x = acts.to("cuda")                                                      # (n, layers, d)
    labels = torch.rand(x.shape[0], device="cuda") < 0.3
    saes[0].encode(x[:, 0])
    latents, t, mem = timed(lambda: [sae.encode(x[:, i]) for i, sae in enumerate(saes)])
    rows.append(dict(shape=shape, approach=f"encode: {n_layers} SAEs x {args.d_sae} latents (float32)",
                     seconds=t, peak_gib=mem))
    _, t, mem = timed(lambda: [score_layer(z, labels) for z in latents])
    rows.append(dict(shape=shape, approach="statistics: frequencies, separation, Welch t, all layers",
                     seconds=t, peak_gib=mem))
    return rows


def hardware_limit(model, args) -> dict:
    """Bytes a decode step must read (weights + the KV cache at mid-generation) over HBM bandwidth."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    ctx = args.prompt_len + args.new_tokens / 2
    kv = args.batch * ctx * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    ms = (weights + kv) / (H100_BANDWIDTH_TBS * 1e12) * 1e3
    return {"weights_gb": weights / 1e9, "kv_read_gb": kv / 1e9, "ms_per_step": ms,
            "tokens_per_s": args.batch / ms * 1e3}


def table(rows: list[dict]) -> str:
    lines = ["| shape | approach | steering | batch | tokens/s | ms/step | peak GiB | vs (a) | vs (b) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "tokens_per_s" not in r:
            extra = (f"{r['identical_rows']}/{r['rows']} identical" if "rows" in r else f"{r['seconds']:.3f} s")
            lines.append(f"| {r['shape']} | {r['approach']} | | | {extra} | | {r.get('peak_gib', 0):.1f} | | |")
            continue
        base = {k: next((x for x in rows if x["shape"] == r["shape"] and x.get("steering") == r["steering"]
                         and x["approach"].startswith(k)), None) for k in ("(a)", "(b)")}
        ratio = {k: (f"{r['tokens_per_s'] / b['tokens_per_s']:.1f}x" if b else "") for k, b in base.items()}
        lines.append(f"| {r['shape']} | {r['approach']} | {r['steering']} | {r['batch']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['ms_per_step']:.2f} | {r['peak_gib']:.1f} | {ratio['(a)']} | {ratio['(b)']} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    results = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": torch.cuda.get_device_name(),
               "torch": torch.__version__, "python": platform.python_version(), "args": vars(args) | {"out": str(args.out)},
               "rows": [], "hardware_limit": {}}
    import transformers

    results["transformers"] = transformers.__version__
    for shape in args.shapes.split(","):
        model = random_model(shape)
        results["hardware_limit"][shape] = hardware_limit(model, args)
        results["rows"] += bench_generation(model, args, shape)
        results["rows"] += bench_analysis(model, args, shape)
        del model
        torch.cuda.empty_cache()
        args.out.write_text(json.dumps(results, indent=2))
    print(f"{results['device']}, torch {results['torch']}, transformers {results['transformers']}, {results['date']}")
    print(f"prompts {args.prompt_len} tokens, {args.new_tokens} new tokens, batch {args.batch}")
    print(table(results["rows"]))
    for r in results["rows"]:
        if "decode_ms_per_step" in r:
            print(f"{r['shape']} {r['approach']} {r['steering']}: prefill {r['prefill_s']:.3f} s, decode "
                  f"{r['decode_ms_per_step']:.2f} ms/step ({args.batch / r['decode_ms_per_step'] * 1e3:,.0f} tokens/s "
                  "excluding prefill)")
    for shape, hl in results["hardware_limit"].items():
        print(f"{shape}: memory-bound limit at batch {args.batch}: {hl['ms_per_step']:.2f} ms/step "
              f"({hl['tokens_per_s']:,.0f} tokens/s; reads {hl['weights_gb']:.1f} GB weights + {hl['kv_read_gb']:.1f} GB KV)")


if __name__ == "__main__":
    main()
