"""Write a local stand-in of the Hugging Face hub for gemma-2-2b, GemmaScope (2b, residual, 16k) and
pile-10k, then point the hub clients at it:

    python scripts/make_hub_fixture.py --out /tmp/hubfix --scale tiny
    HF_HOME=/tmp/hubfix HF_HUB_OFFLINE=1 PVA_SAE_REGISTRY_OVERRIDE=/tmp/hubfix/registry_override.json \\
        pva-sae run --model gemma-2-2b ...

``--scale full`` writes the real shapes (about 5 GB of bfloat16 weights and 26 x 302 MB of SAEs; no
override is needed). See ``pva_sae.default.hub_fixture``.

Random weights solve no task, so the analysis of a run of them finds one class only. After its build,
``--plant-labels RUN_DIR`` marks every third task correct (``pva_sae.default.hub_fixture.labels``) so the
later stages run; their results then describe the planted labels, not the model.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pva_sae.default.hub_fixture.build import SCALES, build_hub_fixture
from pva_sae.default.hub_fixture.labels import plant_labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="fixture directory (becomes HF_HOME)")
    parser.add_argument("--plant-labels", metavar="RUN_DIR", help="only plant labels in this finished build")
    parser.add_argument("--scale", choices=SCALES, default="tiny", help="real shapes or CPU-test shapes")
    parser.add_argument("--layers", help="comma-separated GemmaScope layers to write (default: every layer)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="dtype of the written weights (the hub's copy of gemma-2-2b is float32, 10.5 GB)")
    parser.add_argument("--device", default="cpu", help="device for the SAE threshold calibration (cpu, cuda)")
    args = parser.parse_args(argv)
    if args.plant_labels:
        n, n_correct = plant_labels(args.plant_labels)
        print(f"planted labels in {args.plant_labels}: {n_correct} of {n} samples correct")
        return 0
    if not args.out:
        parser.error("--out is required")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    summary = build_hub_fixture(args.out, args.scale, layers=layers, seed=args.seed, dtype=args.dtype,
                                device=args.device)
    print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
