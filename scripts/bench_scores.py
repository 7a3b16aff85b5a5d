"""Benchmark latent scoring (pva_sae.stats) at the size of a gemma-2-2b analysis.

Random sparse activations stand in for SAE outputs: ``--tasks`` x ``--latents`` per layer with about
``--l0`` latents firing per task (GemmaScope 16k SAEs fire ~70-140), generated one layer at a time
from a seeded torch generator. Timed, per device:

* ``score_layer``: the statistics of one layer (frequencies, separation, Welch t, means), summed
  over ``--layers`` layers; generation excluded.
* ``score_all_layers``: the streaming entry point end to end, generation included.
* ``scipy ttest_ind``: scipy's vectorised Welch test (float64) on the same data, for reference.
* ``encode``: a random JumpReLU SAE of gemma-2-2b size (d_model 2304) encoding every layer's
  residuals, the step that precedes scoring in a real run (skip with ``--no-encode``).

Usage: ``python scripts/bench_scores.py [--device cpu|cuda|all] [--repeats 3]``; prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import time

import torch

from pva_sae.stats import latents as stats


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=500)
    p.add_argument("--layers", type=int, default=26)
    p.add_argument("--latents", type=int, default=16384)
    p.add_argument("--l0", type=int, default=100, help="latents firing per task (approximately)")
    p.add_argument("--d-model", type=int, default=2304, help="residual width for the encode benchmark")
    p.add_argument("--correct-frac", type=float, default=0.3, help="share of correct tasks (gemma-2-2b: ~30%%)")
    p.add_argument("--device", default="all", help="cpu, cuda or all (cuda only when available)")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-encode", action="store_true", help="skip the SAE encode benchmark")
    return p.parse_args()


def make_labels(n: int, frac: float, gen: torch.Generator) -> torch.Tensor:
    labels = torch.zeros(n, dtype=torch.bool)
    labels[: round(n * frac)] = True
    return labels[torch.randperm(n, generator=gen)]


def sparse_layer(n: int, d: int, l0: int, gen: torch.Generator) -> torch.Tensor:
    """(n, d) float32 with ~l0 positive entries per row (JumpReLU-like magnitudes, 1-20)."""
    acts = torch.zeros(n, d)
    idx = torch.randint(0, d, (n, l0), generator=gen)
    values = torch.rand(n, l0, generator=gen) * 19 + 1
    return acts.scatter_(1, idx, values)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bench_score_layer(args, device: str, labels: torch.Tensor) -> float:
    """Seconds for score_layer over all layers, generation excluded (layers generated before timing each)."""
    gen = torch.Generator().manual_seed(args.seed)
    total = 0.0
    labels = labels.to(device)
    for _ in range(args.layers):
        acts = sparse_layer(args.tasks, args.latents, args.l0, gen).to(device)
        stats.score_layer(acts, labels)  # warm-up (allocator, kernels)
        total += median_time(lambda: stats.score_layer(acts, labels), args.repeats, device)
    return total


def bench_stream(args, device: str, labels: torch.Tensor) -> float:
    """Seconds for score_all_layers fed by a generator that creates each layer on demand."""

    def run():
        gen = torch.Generator().manual_seed(args.seed)
        layers = ((layer, sparse_layer(args.tasks, args.latents, args.l0, gen)) for layer in range(args.layers))
        stats.score_all_layers(layers, labels, device=device)

    return median_time(run, args.repeats, device)


def bench_scipy(args, labels: torch.Tensor) -> float:
    from scipy import stats as sps

    gen = torch.Generator().manual_seed(args.seed)
    y = labels.numpy()
    total = 0.0
    for _ in range(args.layers):
        x = sparse_layer(args.tasks, args.latents, args.l0, gen).double().numpy()
        start = time.perf_counter()
        with __import__("warnings").catch_warnings():
            __import__("warnings").simplefilter("ignore")
            sps.ttest_ind(x[y], x[~y], equal_var=False, axis=0)
        total += time.perf_counter() - start
    return total


def bench_encode(args, device: str) -> float:
    """Seconds to encode (tasks, d_model) residuals through a random (d_model, latents) JumpReLU SAE, all layers."""
    from pva_sae.sae.jumprelu import JumpReLUSAE

    gen = torch.Generator().manual_seed(args.seed)
    W_dec = torch.randn(args.latents, args.d_model, generator=gen)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    sae = JumpReLUSAE(W_dec.T.contiguous(), W_dec, torch.zeros(args.latents), torch.zeros(args.d_model),
                      torch.full((args.latents,), 0.5)).to(device)
    resid = (torch.randn(args.tasks, args.d_model, generator=gen) * 3).to(torch.bfloat16).to(device)
    sae.encode(resid)
    return args.layers * median_time(lambda: sae.encode(resid), args.repeats, device)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def devices(spec: str) -> list[str]:
    if spec == "all":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if spec == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return [spec]


def main() -> None:
    args = parse_args()
    labels = make_labels(args.tasks, args.correct_frac, torch.Generator().manual_seed(args.seed + 1))
    shape = f"{args.tasks} tasks x {args.layers} layers x {args.latents} latents, ~{args.l0} firing per task"
    print(f"# bench_scores: {shape}")
    print(f"date {datetime.date.today().isoformat()}; {cpu_name()}; {os.cpu_count()} logical CPUs; "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads); median of {args.repeats}")
    rows = []
    for device in devices(args.device):
        name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        rows.append(("score_layer, all layers (generation excluded)", name,
                     bench_score_layer(args, device, labels)))
        rows.append(("score_all_layers, streamed (generation included)", name,
                     bench_stream(args, device, labels)))
        if not args.no_encode:
            rows.append((f"encode {args.tasks}x{args.d_model} bf16 -> {args.latents}, all layers", name,
                         bench_encode(args, device)))
    rows.append(("scipy ttest_ind(axis=0, float64), all layers", "cpu", bench_scipy(args, labels)))
    print()
    print("| measurement | device | total s | ms per layer |")
    print("|---|---|---:|---:|")
    for what, device, seconds in rows:
        print(f"| {what} | {device} | {seconds:.3f} | {1000 * seconds / args.layers:.1f} |")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak resident memory {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
