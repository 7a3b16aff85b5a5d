"""pva-sae: MBPP generation, sandboxed labelling and SAE analysis of code-correctness awareness.

Every subcommand takes ``--config FILE`` (JSON or TOML) and ``--set section.field=value`` overrides;
``pva-sae config`` prints every field with its documentation. User errors (bad config, bad data,
missing model or SAE, corrupted checkpoint) print one clear message and exit with status 2.
Ctrl+C (or SIGTERM) anywhere prints one message saying what is kept and exits with 130 (143): the build
writes an emergency save first, and every finished stage and steering condition is kept for the rerun.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Callable, Sequence

from pva_sae import __version__
from pva_sae.config import DATASETS, SITES, describe
from pva_sae.errors import InputError, PvaSaeError

EXIT_USER_ERROR = 2


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="JSON or TOML config file (sections as in `pva-sae config`)")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override one field, e.g. --set generation.temperature=0.5 (repeatable)")
    p.add_argument("--run-dir", help="run directory (output.run_dir)")
    p.add_argument("--model", help="model: registry key, hub id or local directory (model.name)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=DATASETS, help="benchmark (data.dataset)")
    p.add_argument("--start", type=int, help="first task index, 0-based inclusive (data.start_idx)")
    p.add_argument("--end", type=int, help="last task index, inclusive (data.end_idx)")
    p.add_argument("--format", choices=("json", "parquet", "both"), help="dataset format (output.save_format)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="resume from the latest checkpoint without asking")
    group.add_argument("--no-resume", action="store_true", help="start over (earlier saves are moved aside)")
    group.add_argument("--resume-from", metavar="CHECKPOINT", help="resume from this checkpoint file")


def _analyze_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae-release", help="SAE release (analysis.sae_release; see `pva-sae saes`)")
    p.add_argument("--sae-dir", help="local directory mirroring the SAE repository (analysis.sae_local_dir)")
    p.add_argument("--site", choices=SITES, help="residual site (analysis.site)")


def _shard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard", metavar="I/N", help="do shard I of N of the generating work (0-based; e.g. "
                   "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT), then merge when every shard is done "
                   "(distributed.shard); under torchrun the rank is the shard")


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir_arg", nargs="?", metavar="RUN_DIR", help="run directory to merge (or --run-dir)")


def _transfer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transfer-from", metavar="RUN_DIR", help="evaluate and steer with that finished run's frozen "
                   "latents, thresholds, probes and alphas instead of choosing them here (validation.transfer_from)")


def _overrides(args: argparse.Namespace) -> list[str]:
    out = list(args.overrides)
    mapping = {"run_dir": "output.run_dir", "model": "model.name", "start": "data.start_idx",
               "end": "data.end_idx", "format": "output.save_format", "resume_from": "checkpoint.resume_from",
               "sae_release": "analysis.sae_release", "sae_dir": "analysis.sae_local_dir", "site": "analysis.site",
               "dataset": "data.dataset", "transfer_from": "validation.transfer_from", "shard": "distributed.shard"}
    for attr, key in mapping.items():
        value = getattr(args, attr, None)
        if value is not None:
            out.append(f"{key}={value}")
    if getattr(args, "shard", None) is None and not any(o.startswith("distributed.shard=") for o in args.overrides):
        out.insert(0, "distributed.shard=")   # the shard is this command's, never inherited from a run's saved config
    if getattr(args, "resume", False):
        out.append("checkpoint.resume=auto")
    if getattr(args, "no_resume", False):
        out.append("checkpoint.resume=never")
    return out


def _config(args: argparse.Namespace):
    """The resolved config: defaults <- the model's registered defaults <- --config file <- overrides."""
    from pva_sae.model.registry import resolve_for_model

    cfg = resolve_for_model(args.config, _overrides(args))
    args.resolved_run_dir = cfg.output.run_dir     # named by the message of an interrupted command
    return cfg


def _run_config(args: argparse.Namespace, stage: str):
    """For stages after the build, the run directory is the source of truth (:func:`pva_sae.api.stage_config`):
    the config the stage, else the stage before it, ran with, then --config and --set."""
    from pva_sae.api import stage_config

    cfg = stage_config(stage, args.config, _overrides(args))
    args.resolved_run_dir = cfg.output.run_dir
    return cfg


def cmd_build(args: argparse.Namespace) -> int:
    from pva_sae import pipeline

    return _print(pipeline.build_lines(_config(args), progress=not args.quiet))


def cmd_merge(args: argparse.Namespace) -> int:
    from pva_sae import pipeline

    run_dir = args.run_dir_arg or args.run_dir
    if run_dir is None:
        print("pva-sae: error: merge needs the run directory: pva-sae merge RUN_DIR", file=sys.stderr)
        return EXIT_USER_ERROR
    return _print(pipeline.merge_lines(run_dir))


def cmd_analyze(args: argparse.Namespace) -> int:
    from pva_sae import pipeline

    return _print(pipeline.analyze_lines(_run_config(args, "analyze"), progress=not args.quiet))


def cmd_validate(args: argparse.Namespace) -> int:
    from pva_sae import pipeline

    return _print(pipeline.validate_lines(_run_config(args, "validate"), progress=not args.quiet))


def cmd_steer(args: argparse.Namespace) -> int:
    from pva_sae import pipeline

    return _print(pipeline.steer_lines(_run_config(args, "steer"), progress=not args.quiet))


def cmd_ablate(args: argparse.Namespace) -> int:
    from pva_sae import pipeline

    return _print(pipeline.ablate_lines(_run_config(args, "ablate"), progress=not args.quiet))


def cmd_attention(args: argparse.Namespace) -> int:
    from pva_sae import pipeline

    return _print(pipeline.attention_lines(_run_config(args, "attention"), progress=not args.quiet))


def cmd_report(args: argparse.Namespace) -> int:
    from pva_sae import pipeline

    return _print(pipeline.report_lines(_config(args)))


def cmd_run(args: argparse.Namespace) -> int:
    from pva_sae import pipeline

    return _print(pipeline.run_pipeline(_config(args), progress=not args.quiet))


def _print(lines: list[str]) -> int:
    """Print a command's summary lines; the command succeeded."""
    for line in lines:
        print(line)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import json

    cfg = _config(args)
    if args.docs:
        for key, tp, default, help_text in describe():
            print(f"{key} ({tp}, default {default!r})\n    {help_text}")
    else:
        print(json.dumps(cfg.to_dict(), indent=2))
    return 0


def cmd_models(args: argparse.Namespace) -> int:  # noqa: ARG001
    from pva_sae.model.registry import list_models

    for entry in list_models():
        print(f"{entry['key']:<16} {entry.get('hf_id') or entry.get('path', '')}  layers={entry['n_layers']} "
              f"d_model={entry['d_model']}")
    return 0


def cmd_saes(args: argparse.Namespace) -> int:  # noqa: ARG001
    from pva_sae.sae.registry import list_releases

    for entry in list_releases():
        print(f"{entry['key']:<24} model={entry.get('model')} arch={entry.get('arch')} layers={entry.get('n_layers')} "
              f"{entry.get('repo') or entry.get('path', '')}")
    return 0


def cmd_checkpoints(args: argparse.Namespace) -> int:
    from pva_sae.config import CheckpointConfig
    from pva_sae.rundir.checkpoint import Checkpointer
    from pva_sae.rundir.paths import RunDir

    cfg = _config(args)
    cp = Checkpointer(RunDir.at(cfg.output.run_dir), CheckpointConfig(), {}, 0, 0)
    paths = cp.candidates()
    if not paths:
        print(f"no saves in {cfg.output.run_dir}")
    latest = cp.find_latest()
    for path in sorted(paths):
        print(("* " if path == latest else "  ") + str(path))
    return 0


def _download_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--dry-run", action="store_true", help="list the files and their sizes, download nothing")
    group.add_argument("--check", action="store_true",
                       help="offline: verify that the local cache holds every file a run needs")


def cmd_download(args: argparse.Namespace) -> int:
    from pva_sae.model import download
    from pva_sae.model.registry import registry_entry

    cfg = _config(args)
    entry = registry_entry(cfg.model.name)
    if args.check:
        present, problems = download.check_cache(cfg, entry)
        print("\n".join(download.format_files([f for f, _ in present])))
        download.raise_if_incomplete(problems, cfg)
        print(download.offline_instructions(cfg))
        return 0
    files = download.needed_files(cfg, entry)
    print("\n".join(download.format_files(files)))
    if not args.dry_run:
        download.download(files)
        print(download.offline_instructions(cfg))
    return 0


def _train_saes_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default="packaged",
                   help="text to train on: .jsonl (text field), .parquet (text column), .txt (paragraphs) or 'packaged'")
    p.add_argument("--layers", required=True, help="comma-separated layers, e.g. 0,6,12")
    p.add_argument("--out", required=True, help="empty directory for <out>/layer_{L}/params.npz")
    p.add_argument("--d-sae", type=int, default=None, help="latents per SAE (default: SAETrainConfig's)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: SAETrainConfig's)")
    p.add_argument("--target-l0", type=float, default=None, help="mean L0 to adapt the sparsity penalty towards")
    p.add_argument("--max-docs", type=int, default=10_000, help="documents of the corpus to use")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per document (BOS included)")


def cmd_train_saes(args: argparse.Namespace) -> int:
    import dataclasses

    from pva_sae.sae.fit import train_saes_for_model
    from pva_sae.sae.train import SAETrainConfig

    try:
        layers = [int(x) for x in args.layers.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--layers {args.layers!r}: expected comma-separated integers such as 0,6,12") from None
    changes = {k: v for k, v in {"d_sae": args.d_sae, "steps": args.steps, "target_l0": args.target_l0}.items()
               if v is not None}
    cfg = _config(args)
    summary = train_saes_for_model(cfg.model.name, args.corpus, layers, args.out,
                                   sae=dataclasses.replace(SAETrainConfig(), **changes), max_docs=args.max_docs,
                                   max_tokens=args.max_tokens, device=cfg.model.device)
    print(f"train-saes: {len(layers)} SAEs for {summary['model']} on {summary['n_documents']} documents "
          f"in {summary['seconds']:.0f} s -> {args.out}")
    for layer, q in summary["quality"].items():
        shown = ", ".join(f"{k} {v:.3g}" for k, v in q.items())
        print(f"         layer {layer}: {shown}")
    print(f"         analyse with: pva-sae analyze --model {cfg.model.name} --set analysis.sae_release=local "
          f"--set analysis.sae_local_dir={args.out} --set \"analysis.layers=[{args.layers}]\"")
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str, list[Callable]]] = {
    "run": (cmd_run, "run every pipeline stage (default: the embedded model, offline)",
            [_build_args, _analyze_args, _transfer_args, _shard_args]),
    "build": (cmd_build, "stage 1: generate MBPP solutions, run their tests, save the labelled dataset",
              [_build_args, _shard_args]),
    "analyze": (cmd_analyze, "stage 2: SAE latents at the last prompt token that separate correct from incorrect",
                [_analyze_args]),
    "validate": (cmd_validate, "stage 3: AUROC/F1 of the chosen latents on held-out tasks, baselines, robustness",
                 [_transfer_args, _shard_args]),
    "steer": (cmd_steer, "stage 4: steering with latent directions: correction/corruption vs control latents",
              [_transfer_args]),
    "ablate": (cmd_ablate, "remove the steering directions from the residual stream (weights orthogonalized or hooks): "
                           "corruption/correction vs controls", []),
    "attention": (cmd_attention, "attention from the last prompt token to the prompt's sections, baseline and under "
                                 "steering", []),
    "report": (cmd_report, "write the HTML and Markdown report of a run directory", []),
    "config": (cmd_config, "print the resolved config (--docs: every field with its documentation)", []),
    "models": (cmd_models, "list the model registry", []),
    "saes": (cmd_saes, "list the SAE release registry", []),
    "merge": (cmd_merge, ("merge the parts of a sharded build (--shard I/N or torchrun) into the run directory; "
                          "refuses a missing or duplicated shard, naming its key"), [_merge_args]),
    "train-saes": (cmd_train_saes, "train JumpReLU SAEs on a model's residual stream from a text corpus (for models "
                   "without published SAEs); the analysis reads them with analysis.sae_release=local",
                   [_train_saes_args]),
    "checkpoints": (cmd_checkpoints, "list the checkpoints of a run directory (* = latest)", []),
    "download": (cmd_download, "fetch every hub file a run of --model needs (model, SAEs, general corpus) into the "
                 "Hugging Face cache, for offline runs", [_analyze_args, _download_args]),
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pva-sae", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"pva-sae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (func, help_text, extras) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _common(p)
        for extra in extras:
            extra(p)
        if name == "config":
            p.add_argument("--docs", action="store_true", help="list every field with its documentation")
        p.set_defaults(func=func)
    return parser




def quiet() -> None:
    """Silence every progress bar, ours and those of transformers / huggingface_hub (weight loading)."""
    os.environ["TQDM_DISABLE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    # only on --quiet: transformers is slow to import
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `pva-sae` must not start an hours-long run
        parser.print_help()
        return EXIT_USER_ERROR
    previous = _interrupts_raise()
    try:
        if getattr(args, "quiet", False):
            quiet()
        return args.func(args)
    except PvaSaeError as exc:
        if getattr(exc, "exit_status", EXIT_USER_ERROR) == 0:   # a shard done before the others: not an error
            print(f"pva-sae: {exc}", file=sys.stderr)
            return 0
        print(f"pva-sae: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:
        signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
        return interrupted(args, signum)
    except Exception as exc:
        dataset = sys.modules.get("pva_sae.execution.dataset")   # loaded by any step that can be interrupted so
        if dataset is not None and isinstance(exc, dataset.BuildInterrupted):
            return interrupted(args, exc.signum, reported=True)   # its emergency save was already announced
        raise
    finally:
        _restore(previous)


# --------------------------------------------------------------------------- Ctrl+C and SIGTERM

STAGE_ORDER = ("build", "analyze", "validate", "steer")


def _interrupts_raise() -> dict[int, object]:
    """SIGTERM raises KeyboardInterrupt(SIGTERM) as SIGINT does, so both end a command the same way (the
    build installs its own handlers around its loop). Returns the handlers to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(signum)

    previous = {signal.SIGINT: signal.getsignal(signal.SIGINT), signal.SIGTERM: signal.getsignal(signal.SIGTERM)}
    signal.signal(signal.SIGTERM, handler)
    return previous


def _restore(previous: dict[int, object]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def interrupted(args: argparse.Namespace, signum: int, reported: bool = False) -> int:
    """End an interrupted command: one message (what is kept, how to resume), no traceback, exit 128 + signal.

    Further Ctrl+C presses while it ends are ignored, so the message is printed once."""
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
    if not reported:
        import logging

        from pva_sae.rundir.logs import setup_logging

        logger = logging.getLogger("pva_sae")
        if not any(getattr(h, "_pva_sae", False) for h in logger.handlers):
            setup_logging(None)      # nothing logged yet: the console handler only
        try:
            kept = _kept(args)
        except (OSError, PvaSaeError):   # a damaged save must not turn the message into a traceback
            kept = ""
        logger.getChild("cli").error("interrupted (%s)%s; rerun the same command to resume",
                                     signal.Signals(signum).name, kept)
    return 128 + signum


def _kept(args: argparse.Namespace) -> str:
    """Where the command stopped and what its run directory keeps (finished stages, saved conditions)."""
    from pva_sae.rundir.paths import RunDir

    run_dir = getattr(args, "resolved_run_dir", None) or getattr(args, "run_dir", None)
    if run_dir is None or not RunDir.at(run_dir).root.is_dir():
        return ""
    run = RunDir.at(run_dir)
    done = [s for s in STAGE_ORDER if run.is_done(s)]
    stage = args.command
    if stage == "run":
        stage = next((s for s in STAGE_ORDER if s not in done), "report")
    kept = [f"finished stages ({', '.join(done)}) are kept" if done else "no stage had finished"]
    if stage == "build":
        kept.append(_latest_save(run))
    conditions = run.root / "steering" / "conditions"
    if stage == "steer" and conditions.is_dir():
        kept.append(f"{len(list(conditions.glob('*.json')))} finished steering conditions are saved and will "
                    "not be rerun")
    return f" during {stage} in {run.root}: " + "; ".join(kept)


def _latest_save(run) -> str:
    from pva_sae.config import CheckpointConfig
    from pva_sae.rundir.atomic import read_json
    from pva_sae.rundir.checkpoint import Checkpointer

    latest = Checkpointer(run, CheckpointConfig(), {}, 0, 0).find_latest()
    if latest is None:
        return "no record had been saved"
    return f"the latest save holds {read_json(latest)['n_records']} records ({latest})"


if __name__ == "__main__":
    sys.exit(main())
