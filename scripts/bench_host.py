"""Host-side work per generated sample on the continuous-batching path: stop-string checks and decoding.

On a GPU the embedded default decodes a step in about a millisecond, so what the host does per sample sets the
pace of a study (the steering stage generates tens of thousands of samples). This measures, without a model, the
two per-sample costs the queue pays on the host, with the default tokenizer and stop strings:

- stop checks: each of ``--rows`` rows (MBPP prompt, then the task's reference solution followed by a stop
  string or other text as its "completion") grows 16 tokens per check, as in the queue, and is checked
  (``Generator._queue_stop_checker``) until a stop string is found or its tokens run out;
- decoding: ``decode_continuation`` and ``cut_at_stop`` once per row, as when a row finishes; and the same with
  the prompt's text already decoded (the Generator decodes each prompt once; steering repeats every prompt once
  per condition).

Prints ms per row and writes JSON (``--out``, default ``docs/bench_host_<device>_<date>.json``)::

    python scripts/bench_host.py --device cpu2
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import time
from importlib.resources import files
from pathlib import Path

import torch

from pva_sae.config import GenerationConfig
from pva_sae.data import mbpp, prompts
from pva_sae.model.generation import Generator, cut_at_stop, decode_continuation, stop_criterion

TAILS = ["\n\nassert f(1) == 2\n", "\nprint(x)\n", "\nif __name__ == '__main__':\n    main()\n", "\n# end\n"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", required=True, help="short machine name for the output file, e.g. cpu2")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--check-every", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(files("pva_sae") / "assets" / "default" / "model"))
    cfg = GenerationConfig(backend="hf")
    generator = Generator.__new__(Generator)            # its host-side helpers only: no model
    generator.tokenizer, generator.cfg, generator.stop_strings = tok, cfg, tuple(cfg.stop_strings)
    generator._stop_criterion, generator._prompt_cache = stop_criterion(tok, generator.stop_strings), {}
    generator._stop_memo = {}       # the criterion's remembered windows: emptied before every timed pass
    rng = random.Random(0)
    tasks = (mbpp.load_tasks("packaged") * 2)[:args.rows]
    prompt_ids = [generator.prompt_ids(prompts.build_prompt(t)) for t in tasks]
    news = [tok(t.code + rng.choice(TAILS), add_special_tokens=False)["input_ids"] for t in tasks]
    check = generator._queue_stop_checker(prompt_ids)

    def stop_checks() -> tuple[int, int]:
        generator._stop_memo.clear()
        checked, live, calls, stopped = [0] * len(news), set(range(len(news))), 0, 0
        steps = 0
        while live:
            steps += args.check_every
            order = sorted(live)
            requests = [(i, news[i][:steps], checked[i]) for i in order]
            calls += 1
            for i, found, (_, new, _) in zip(order, check(requests), requests):
                if found is not None or len(new) >= len(news[i]):
                    live.discard(i)
                    stopped += found is not None
                else:
                    checked[i] = len(new)
        return calls, stopped

    def decodes() -> None:
        for p, n in zip(prompt_ids, news):
            cut_at_stop(decode_continuation(tok, p, n), generator.stop_strings)

    prompt_texts = [tok.decode(p, skip_special_tokens=True) for p in prompt_ids]

    def decodes_known_prompt() -> None:
        for p, n, text in zip(prompt_ids, news, prompt_texts):
            cut_at_stop(decode_continuation(tok, p, n, text), generator.stop_strings)

    rows = {}
    for name, fn in (("stop_checks", stop_checks), ("decode_and_cut", decodes),
                     ("decode_and_cut_prompt_known", decodes_known_prompt)):
        fn()                                                 # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            extra = fn()
            times.append(time.perf_counter() - t0)
        rows[name] = {"ms_per_row": 1000 * min(times) / len(news), "seconds": min(times)}
        if name == "stop_checks":
            rows[name].update(checks=extra[0], rows_stopped=extra[1])
    now = datetime.datetime.now(datetime.UTC)
    result = {"device": args.device, "date": now.isoformat(timespec="seconds"), "python": platform.python_version(),
              "torch": torch.__version__, "rows": len(news), "new_tokens": sum(map(len, news)),
              "check_every": args.check_every, "results": rows}
    out = args.out or Path(__file__).resolve().parents[1] / "docs" / f"bench_host_{args.device}_{now:%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for name, r in rows.items():
        print(f"{name}: {r['ms_per_row']:.3f} ms per row ({len(news)} rows, {result['new_tokens']:,} new tokens)")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
