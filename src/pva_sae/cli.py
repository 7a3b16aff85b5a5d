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
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from pva_sae import __version__
from pva_sae.config import DATASETS, SITES, describe
from pva_sae.errors import InputError, PvaSaeError

if TYPE_CHECKING:
    from pva_sae.api import Run
    from pva_sae.config import Config

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
    from pva_sae.stages.build import build_dataset

    cfg = _config(args)
    records = build_dataset(cfg, progress=not args.quiet)
    n_pass = sum(r["passed"] for r in records)
    print(f"built {len(records)} samples ({n_pass} passed, {n_pass / max(len(records), 1):.1%}) "
          f"in {cfg.output.run_dir}/datasets")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from pva_sae.stages.merge import merge

    run_dir = args.run_dir_arg or args.run_dir
    if run_dir is None:
        print("pva-sae: error: merge needs the run directory: pva-sae merge RUN_DIR", file=sys.stderr)
        return EXIT_USER_ERROR
    merged = merge(run_dir)
    for root, n in merged.items():
        print(f"merged {n} samples from the shards into {root}/datasets")
    if not merged:
        print(f"{run_dir}: every sharded build is merged already")
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
    from pva_sae.stages.report import write_report
    from pva_sae.stages.validate import validate
    from pva_sae.summary import validation_summary

    cfg = _run_config(args, "validate")
    results = validate(cfg, progress=not args.quiet)
    html_path, _ = write_report(cfg.output.run_dir)
    print("\n".join(validation_summary(results)))
    print(f"results in {ValidationPaths.of(RunDir.at(cfg.output.run_dir)).results}; report {html_path}")
    return 0


def cmd_steer(args: argparse.Namespace) -> int:
    from pva_sae.rundir.paths import RunDir, SteeringPaths
    from pva_sae.stages.report import write_report
    from pva_sae.stages.steer import steer
    from pva_sae.summary import steering_summary

    cfg = _run_config(args, "steer")
    results = steer(cfg, progress=not args.quiet)
    html_path, _ = write_report(cfg.output.run_dir)
    print("\n".join(steering_summary(results)))
    print(f"results in {SteeringPaths.of(RunDir.at(cfg.output.run_dir)).results}; report {html_path}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from pva_sae.rundir.paths import AblationPaths, RunDir
    from pva_sae.stages.ablate import ablate

    cfg = _run_config(args, "ablate")
    results = ablate(cfg, progress=not args.quiet)
    for name, e in results["experiments"].items():
        rate, control = e["rate"], e["controls_summary"]["mean_rate"]
        print(f"{name}: target {rate['successes']}/{rate['n']}, controls' mean "
              f"{'n/a' if control is None else f'{control:.1%}'}, rank p {e['rank_p']['p']}")
    print(f"results in {AblationPaths.of(RunDir.at(cfg.output.run_dir)).results}")
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    from pva_sae.rundir.paths import AttentionPaths, RunDir
    from pva_sae.stages.attention import attention

    cfg = _run_config(args, "attention")
    results = attention(cfg, progress=not args.quiet)
    for direction, diff in results["differences"].items():
        print(f"steering {direction}: " + ", ".join(
            f"{section} {d['estimate']:+.2%} [{d['ci'][0]:+.2%}, {d['ci'][1]:+.2%}]"
            for section, d in diff["overall"].items()))
    print(f"results in {AttentionPaths.of(RunDir.at(cfg.output.run_dir)).results}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pva_sae.stages.report import write_report

    cfg = _config(args)
    html_path, md_path = write_report(cfg.output.run_dir)
    print(f"report: {html_path} (Markdown: {md_path})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
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


# --------------------------------------------------------------------------- `pva-sae run` and the Python API's
# stage calls (exported by the package: pva_sae.build_dataset, analyze, validate, steer, report, run). They sit here,
# beside the commands, because only the entry points call the stages; pva_sae.api holds what they share with the
# command line (configs) and the reading of a run's results.

def run_pipeline(cfg: Config, progress: bool = True, *, loaded=None) -> list[str]:
    """Run the stages; return human-readable summary lines (where the results are). ``loaded`` (a LoadedModel,
    or a callable returning one) is the model every stage uses; by default it is loaded once, when first needed."""
    from pva_sae.config import DIRECTIONS
    from pva_sae.execution.dataset import announce
    from pva_sae.model.registry import load_once
    from pva_sae.rundir.paths import AnalysisPaths, RunDir
    from pva_sae.stages.analyze import analyze as _analyze
    from pva_sae.stages.build import build_dataset as _build
    from pva_sae.stages.report import write_report
    from pva_sae.stages.steer import steer as _steer
    from pva_sae.stages.validate import validate as _validate
    from pva_sae.summary import steering_summary, validation_summary

    run = RunDir.at(cfg.output.run_dir)
    model = load_once(cfg.model) if loaded is None else loaded
    lines = []
    started = time.perf_counter()
    records = _build(cfg, progress=progress, loaded=model)
    n_pass = sum(r["passed"] for r in records)
    lines.append(f"build:   {len(records)} samples, {n_pass} passed ({n_pass / max(len(records), 1):.1%}) "
                 f"-> {run.datasets}")
    t0 = time.perf_counter()
    summary = _analyze(cfg, progress=progress, loaded=model)
    paths = AnalysisPaths.of(run)
    lines.append(f"analyze: {summary['n_tasks']} SAE-split tasks ({summary['n_correct']} correct), "
                 f"{len(summary['layers'])} layers, release {summary['release']} ({time.perf_counter() - t0:.0f} s)")
    for direction in DIRECTIONS:
        top = summary["top"][direction][:1]
        if top:
            r = top[0]
            lines.append(f"         top {direction}-predicting latent: layer {r['layer']} latent {r['latent']} "
                         f"(separation {r['sep_' + direction]:.3f}, t {r['t_' + direction]:.2f})")
    lines.append(f"         ranked latents: {paths.ranked_parquet}; plots: {paths.plots}")
    t0 = time.perf_counter()
    results = _validate(cfg, progress=progress, loaded=model)
    lines += ["validate: " + line for line in validation_summary(results)]
    lines.append(f"         temperatures {', '.join(results['temperature'])}; {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    steering = _steer(cfg, progress=progress, loaded=model)
    lines += [("steer:   " if line.startswith(tuple(steering["experiments"])) else "         ") + line
              for line in steering_summary(steering)]
    lines.append(f"         noise floor {steering['noise_floor']['flips']}/{steering['noise_floor']['n']} flips; "
                 f"{time.perf_counter() - t0:.0f} s")
    announce("report", f"writing {run.report_html}", progress)
    html_path, _ = write_report(run.root)
    lines.append(f"report:  {html_path}")
    lines.append(f"finished in {time.perf_counter() - started:.0f} s; results in {run.root}")
    return lines


def build_dataset(model: str | None = None, start_idx: int | None = None, end_idx: int | None = None,
                  save_format: str | None = None, *, config: Config | None = None,
                  run_dir: str | Path | None = None, resume: str | None = None, resume_from: str | None = None,
                  config_file: str | None = None, overrides: dict[str, Any] | None = None, progress: bool = True,
                  loaded=None) -> list[dict[str, Any]]:
    """Stage 1: build the labelled dataset for tasks ``start_idx..end_idx`` (inclusive); returns its records.

    ``resume`` None keeps the config's ('ask', which resumes here: there is no prompt to answer).
    """
    from pva_sae.api import config_items, resolve_stage
    from pva_sae.stages.build import build_dataset as _build

    items = config_items(model=model, start_idx=start_idx, end_idx=end_idx, save_format=save_format,
                         run_dir=run_dir, resume=resume, resume_from=resume_from, overrides=overrides)
    cfg = resolve_stage("build", config, config_file, items)
    return _build(cfg, interactive=False, progress=progress, loaded=loaded)


def analyze(config: Config | None = None, *, run_dir: str | Path | None = None, config_file: str | None = None,
            overrides: dict[str, Any] | None = None, progress: bool = True, loaded=None) -> dict[str, Any]:
    """Stage 2: SAE latents separating correct from incorrect; returns ``analysis/summary.json``'s content
    (the ranked latents are ``load_run(run_dir).ranked``)."""
    from pva_sae.api import config_items, resolve_stage
    from pva_sae.stages.analyze import analyze as _analyze

    cfg = resolve_stage("analyze", config, config_file, config_items(run_dir=run_dir, overrides=overrides))
    return _analyze(cfg, progress=progress, loaded=loaded)


def validate(config: Config | None = None, *, run_dir: str | Path | None = None, config_file: str | None = None,
             overrides: dict[str, Any] | None = None, progress: bool = True, loaded=None) -> dict[str, Any]:
    """Stage 3: the chosen latents as predictors on held-out tasks against baselines; returns
    ``validation/results.json``'s content."""
    from pva_sae.api import config_items, resolve_stage
    from pva_sae.stages.validate import validate as _validate

    cfg = resolve_stage("validate", config, config_file, config_items(run_dir=run_dir, overrides=overrides))
    return _validate(cfg, progress=progress, loaded=loaded)


def steer(config: Config | None = None, *, run_dir: str | Path | None = None, config_file: str | None = None,
          overrides: dict[str, Any] | None = None, progress: bool = True, loaded=None) -> dict[str, Any]:
    """Stage 4: steering along the chosen latents against control directions; returns
    ``steering/results.json``'s content."""
    from pva_sae.api import config_items, resolve_stage
    from pva_sae.stages.steer import steer as _steer

    cfg = resolve_stage("steer", config, config_file, config_items(run_dir=run_dir, overrides=overrides))
    return _steer(cfg, progress=progress, loaded=loaded)


def report(run_dir: str | Path | Config | None = None) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` of a run directory (or of ``Config.output.run_dir``)."""
    from pva_sae.config import Config
    from pva_sae.stages.report import write_report

    if isinstance(run_dir, Config):
        run_dir = run_dir.output.run_dir
    return write_report(run_dir if run_dir is not None else Config().output.run_dir)


def run(config: Config | None = None, *, model: str | None = None, start_idx: int | None = None,
        end_idx: int | None = None, run_dir: str | Path | None = None, resume: str | None = None,
        config_file: str | None = None, overrides: dict[str, Any] | None = None, progress: bool = True,
        loaded=None) -> Run:
    """Every stage in order, then the report (as `pva-sae run`); returns :func:`load_run` of the run directory.
    Finished stages whose inputs did not change are not redone."""
    from pva_sae.api import config_items, load_run, resolve_stage

    items = config_items(model=model, start_idx=start_idx, end_idx=end_idx, run_dir=run_dir, resume=resume,
                         overrides=overrides)
    cfg = resolve_stage("run", config, config_file, items)
    lines = run_pipeline(cfg, progress=progress, loaded=loaded)
    result = load_run(cfg.output.run_dir)
    result.summary_lines = lines
    return result


if __name__ == "__main__":
    sys.exit(main())
