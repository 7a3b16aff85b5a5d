"""Profile one eager decode step of the fast decoder at gemma-2-2b shape (kernel time by operator).

    python scripts/profile_fastgen.py [--batch 256] [--prompt-len 200] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu import random_model  # noqa: E402

from pva_sae.model.fastgen import StaticDecoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="2b")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    model = random_model(args.shape)
    ids = torch.randint(10, model.config.vocab_size, (args.batch, args.prompt_len), device="cuda")
    dec = StaticDecoder(model, eos_ids=[-1], pad_id=0, use_cuda_graph=False)
    dec.generate(ids, torch.ones_like(ids), args.new_tokens)
    st = dec._state
    st.step.fill_(8)                                   # back to mid-generation: room for the profiled steps
    st.idx.fill_(args.prompt_len + 8)
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            dec._decode_step(st, None, (0.0, 1.0, False))   # greedy
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))
    events = prof.key_averages()
    total = sum(e.device_time_total for e in events if e.device_time_total and not e.key.startswith("aten::"))
    print(f"kernel time per step: {total / 3 / 1000:.2f} ms; kernels per step: "
          f"{sum(e.count for e in events if not e.key.startswith('aten::')) // 3}")


if __name__ == "__main__":
    main()
