"""pva-sae: MBPP generation, sandboxed labelling and SAE analysis of code-correctness awareness.

Every subcommand takes ``--config FILE`` (JSON or TOML) and ``--set section.field=value`` overrides;
``pva-sae config`` prints every field with its documentation. User errors (bad config, bad data,
missing model or SAE, corrupted checkpoint) print one clear message and exit with status 2;
an interrupted build exits with 130 after its emergency save.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from pva_sae import __version__
from pva_sae.config import SITES, describe
from pva_sae.errors import PvaSaeError

EXIT_USER_ERROR = 2


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="JSON or TOML config file (sections as in `pva-sae config`)")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override one field, e.g. --set generation.temperature=0.5 (repeatable)")
    p.add_argument("--run-dir", help="run directory (output.run_dir)")
    p.add_argument("--model", help="model: registry key, hub id or local directory (model.name)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _build_args(p: argparse.ArgumentParser) -> None:
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


def _overrides(args: argparse.Namespace) -> list[str]:
    out = list(args.overrides)
    mapping = {"run_dir": "output.run_dir", "model": "model.name", "start": "data.start_idx",
               "end": "data.end_idx", "format": "output.save_format", "resume_from": "checkpoint.resume_from",
               "sae_release": "analysis.sae_release", "sae_dir": "analysis.sae_local_dir", "site": "analysis.site"}
    for attr, key in mapping.items():
        value = getattr(args, attr, None)
        if value is not None:
            out.append(f"{key}={value}")
    if getattr(args, "resume", False):
        out.append("checkpoint.resume=auto")
    if getattr(args, "no_resume", False):
        out.append("checkpoint.resume=never")
    return out


def _config(args: argparse.Namespace):
    """The resolved config: defaults <- the model's registered defaults <- --config file <- overrides."""
    from pva_sae.model.registry import resolve_for_model

    return resolve_for_model(args.config, _overrides(args))


def _run_config(args: argparse.Namespace, stage: str):
    """For stages after the build, the run directory is the source of truth: the config the previous stage
    ran with (``config.json`` of the build, then analysis/ and validation/) is the base, then --config and
    --set. A stage refuses an override of a setting its inputs were made with, naming the field."""
    from pva_sae.config import resolve_config
    from pva_sae.rundir.atomic import read_json
    from pva_sae.rundir.paths import AnalysisPaths, RunDir, SteeringPaths, ValidationPaths

    cfg = _config(args)
    run = RunDir.at(cfg.output.run_dir)
    # a stage's own earlier config first (a rerun keeps its settings), then the stages before it
    chain = {"analyze": [AnalysisPaths.of(run).config, run.config],
             "validate": [ValidationPaths.of(run).config, AnalysisPaths.of(run).config, run.config],
             "steer": [SteeringPaths.of(run).config, ValidationPaths.of(run).config, AnalysisPaths.of(run).config,
                       run.config]}[stage]
    base = next((path for path in chain if path.is_file()), None)
    return cfg if base is None else resolve_config(args.config, _overrides(args), base=read_json(base))


def cmd_build(args: argparse.Namespace) -> int:
    from pva_sae.stages.build import build_dataset

    cfg = _config(args)
    records = build_dataset(cfg, progress=not args.quiet)
    n_pass = sum(r["passed"] for r in records)
    print(f"built {len(records)} samples ({n_pass} passed, {n_pass / max(len(records), 1):.1%}) "
          f"in {cfg.output.run_dir}/datasets")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from pva_sae.rundir.paths import AnalysisPaths, RunDir
    from pva_sae.stages.analyze import analyze

    cfg = _run_config(args, "analyze")
    summary = analyze(cfg, progress=not args.quiet)
    paths = AnalysisPaths.of(RunDir.at(cfg.output.run_dir))
    print(f"analysed {summary['n_tasks']} tasks ({summary['n_correct']} correct) with {summary['release']}; "
          f"ranked latents in {paths.ranked_parquet}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from pva_sae.rundir.paths import RunDir, ValidationPaths
    from pva_sae.stages.report import validation_summary, write_report
    from pva_sae.stages.validate import validate

    cfg = _run_config(args, "validate")
    results = validate(cfg, progress=not args.quiet)
    html_path, _ = write_report(cfg.output.run_dir)
    print("\n".join(validation_summary(results)))
    print(f"results in {ValidationPaths.of(RunDir.at(cfg.output.run_dir)).results}; report {html_path}")
    return 0


def cmd_steer(args: argparse.Namespace) -> int:
    from pva_sae.rundir.paths import RunDir, SteeringPaths
    from pva_sae.stages.report import steering_summary, write_report
    from pva_sae.stages.steer import steer

    cfg = _run_config(args, "steer")
    results = steer(cfg, progress=not args.quiet)
    html_path, _ = write_report(cfg.output.run_dir)
    print("\n".join(steering_summary(results)))
    print(f"results in {SteeringPaths.of(RunDir.at(cfg.output.run_dir)).results}; report {html_path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pva_sae.stages.report import write_report

    cfg = _config(args)
    html_path, md_path = write_report(cfg.output.run_dir)
    print(f"report: {html_path} (Markdown: {md_path})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pva_sae.pipeline import run_pipeline

    cfg = _config(args)
    summary = run_pipeline(cfg, progress=not args.quiet)
    for line in summary:
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


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str, list[Callable]]] = {
    "run": (cmd_run, "run every pipeline stage (default: the embedded model, offline)", [_build_args, _analyze_args]),
    "build": (cmd_build, "stage 1: generate MBPP solutions, run their tests, save the labelled dataset",
              [_build_args]),
    "analyze": (cmd_analyze, "stage 2: SAE latents at the last prompt token that separate correct from incorrect",
                [_analyze_args]),
    "validate": (cmd_validate, "stage 3: AUROC/F1 of the chosen latents on held-out tasks, baselines, robustness",
                 []),
    "steer": (cmd_steer, "stage 4: steering with latent directions: correction/corruption vs control latents", []),
    "report": (cmd_report, "write the HTML and Markdown report of a run directory", []),
    "config": (cmd_config, "print the resolved config (--docs: every field with its documentation)", []),
    "models": (cmd_models, "list the model registry", []),
    "saes": (cmd_saes, "list the SAE release registry", []),
    "checkpoints": (cmd_checkpoints, "list the checkpoints of a run directory (* = latest)", []),
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
    if getattr(args, "quiet", False):
        quiet()
    if args.command is None:  # a bare `pva-sae` must not start an hours-long run
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return args.func(args)
    except PvaSaeError as exc:
        print(f"pva-sae: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:
        from pva_sae.execution.dataset import BuildInterrupted

        if isinstance(exc, BuildInterrupted):
            print(f"pva-sae: {exc}; rerun the same command to resume", file=sys.stderr)
            return 128 + exc.signum
        raise


if __name__ == "__main__":
    sys.exit(main())
