"""Build the embedded default of pva-sae: a miniature Gemma-2 code model and one JumpReLU SAE per layer.

Output (``--out``, normally ``src/pva_sae/assets/default``): the asset directory laid out in
``pva_sae.default.package``. This script is the command line of the modules in ``pva_sae.default``:
``recipe`` (settings and sizes), ``prep`` / ``prepared`` (the prepared directory), ``train`` (the
train command, over ``lm_train`` and ``sae_run``), ``package`` (hashes, pack/unpack), ``evaluate``
and ``card``.

Commands:

* ``prepare --out DIR``: corpora (from THIS interpreter's standard library), tokenizer, token arrays
  and the memorized-task list, on CPU. The directory is small enough to carry to another machine,
  whose Python may have a different standard library.
* ``train --prepared DIR --out ASSETS``: the language model, then the SAEs (GPU recommended).
* ``all --out ASSETS``: both on one machine.
* ``eval --assets ASSETS``: greedy pass@1 on memorized and other MBPP tasks (any machine); the
  numbers go into training.json.
* ``card --assets ASSETS``: render docs/model_card.md (and the loss curve PNG) from training.json.
* ``train ... --pack DIR`` / ``unpack --packed DIR``: move the assets between machines as four flat
  files (two tar archives, training.json, the loss PNG); ``unpack`` restores the directory, adds the
  general corpus from the prepared directory and checks every file's sha256 against training.json.

Two machines (the corpora come from the standard library of the Python that runs ``prepare``)::

    python scripts/train_default.py prepare --out .prep                        # CPU, Python 3.11
    PYTHONPATH=src python scripts/train_default.py train --prepared .prep \
        --out /tmp/default --pack OUTDIR                                       # GPU
    python scripts/train_default.py unpack --packed OUTDIR --prepared .prep    # back on the first
    python scripts/train_default.py card

The LM sees two kinds of rows, half a batch each: windows of the standard-library training corpus
and whole MBPP documents (prompt + newline + reference solution + EOS) of the "memorized" tasks, a
seeded half of MBPP chosen independently of any analysis split. Every row starts with BOS, as every
prompt does at inference. The train step needs only torch, transformers, tokenizers, numpy and
safetensors (plus matplotlib for the PNG, optional).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

# Imported after the line above, so that the script runs from a checkout without installing the package.
from pva_sae.default.card import plot_loss, render_card
from pva_sae.default.evaluate import evaluate
from pva_sae.default.package import unpack
from pva_sae.default.recipe import OVERRIDABLE, PREPARE_OPTIONS, Recipe, recipe_from
from pva_sae.default.records import log
from pva_sae.default.train import train
from pva_sae.rundir.atomic import read_json

ASSETS = ROOT / "src" / "pva_sae" / "assets" / "default"
PREPARED = ROOT / ".prep"
LOSS_PNG = ROOT / "docs" / "images" / "default_loss.png"


def _add_recipe_options(p: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    defaults = Recipe()
    for name in names:
        value = getattr(defaults, name)
        kind = type(value) if value is not None else int
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None,
                       help=f"default {value}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("prepare", help="corpora, tokenizer and token arrays (CPU)")
    pre.add_argument("--out", type=Path, default=PREPARED)
    _add_recipe_options(pre, PREPARE_OPTIONS + OVERRIDABLE)
    tr = sub.add_parser("train", help="train the LM and the SAEs from a prepared directory")
    tr.add_argument("--prepared", type=Path, default=PREPARED)
    al = sub.add_parser("all", help="prepare, then train, on this machine")
    al.add_argument("--prepared", type=Path, default=PREPARED)
    _add_recipe_options(al, PREPARE_OPTIONS)
    for sp in (tr, al):
        sp.add_argument("--out", type=Path, default=ASSETS)
        sp.add_argument("--device", default="auto")
        sp.add_argument("--skip-eval", action="store_true", help="do not run the pass@1 evaluation at the end")
        sp.add_argument("--loss-png", type=Path, default=LOSS_PNG)
        sp.add_argument("--no-png", action="store_true")
        sp.add_argument("--pack", type=Path, default=None,
                        help="also write the assets as a few flat files into this directory (see `unpack`)")
        _add_recipe_options(sp, OVERRIDABLE)
    ev = sub.add_parser("eval", help="greedy pass@1 on memorized and other tasks; writes into training.json")
    ev.add_argument("--assets", type=Path, default=ASSETS)
    ev.add_argument("--prepared", type=Path, default=None)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--batch-size", type=int, default=None)
    ev.add_argument("--max-new-tokens", type=int, default=None, help="default: the recipe's (the pipeline default)")
    ev.add_argument("--max-batch-tokens", type=int, default=None,
                    help="rows x (longest prompt + new tokens) per batch; default: the pipeline's on CPU, "
                         "batch size x (seq_len + new tokens) on GPU")
    up = sub.add_parser("unpack", help="rebuild the asset directory from the files of `train --pack`")
    up.add_argument("--packed", type=Path, required=True)
    up.add_argument("--prepared", type=Path, default=PREPARED)
    up.add_argument("--out", type=Path, default=ASSETS)
    up.add_argument("--loss-png", type=Path, default=LOSS_PNG)
    card = sub.add_parser("card", help="render docs/model_card.md (and the loss PNG) from training.json")
    card.add_argument("--assets", type=Path, default=ASSETS)
    card.add_argument("--prepared", type=Path, default=None)
    card.add_argument("--out", type=Path, default=ROOT / "docs" / "model_card.md")
    card.add_argument("--loss-png", type=Path, default=LOSS_PNG)
    return p.parse_args(argv)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in PREPARE_OPTIONS + OVERRIDABLE if getattr(args, k, None) is not None}


def _prepare(out: Path, args: argparse.Namespace) -> None:
    # Imported here, not at the top: preparing needs the MBPP loader's dependencies (radon, pyarrow),
    # which the GPU machine that runs `train` need not have.
    from pva_sae.default.prep import prepare

    prepare(out, Recipe(**_overrides(args)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "prepare":
        _prepare(args.out, args)
    elif args.command in ("train", "all"):
        if args.command == "all":
            _prepare(args.prepared, args)
        info = read_json(args.prepared / "prepare.json")
        recipe = recipe_from(info, {k: v for k, v in _overrides(args).items() if k in OVERRIDABLE})
        png = None if args.no_png else args.loss_png
        train(args.prepared, args.out, recipe, args.device, not args.skip_eval, png, args.pack)
    elif args.command == "eval":
        record = read_json(args.assets / "training.json")
        recipe = recipe_from(record, {"eval_max_new_tokens": args.max_new_tokens})
        evaluate(args.assets, recipe, args.device, args.prepared, args.batch_size, args.max_batch_tokens)
    elif args.command == "unpack":
        record = read_json(args.packed / "training.json")
        unpack(args.packed, args.prepared, args.out, args.loss_png, recipe_from(record, {}))
    elif args.command == "card":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render_card(args.assets, args.prepared), encoding="utf-8")
        log(f"model card written to {args.out}")
        if (args.assets / "training.json").is_file():
            plot_loss(read_json(args.assets / "training.json"), args.loss_png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
