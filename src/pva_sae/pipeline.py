"""`pva-sae run`: every stage that exists, in order, on one config (by default the embedded model).

Stages: build (labelled dataset) -> analyze (SAE latents) -> validate (held-out metrics, robustness) ->
steer (causal tests), then the report. A stage whose ``.done`` marker is present
is not redone when its inputs are unchanged, so rerunning an interrupted pipeline continues where it
stopped.
"""

from __future__ import annotations

import time

from pva_sae.config import DIRECTIONS, Config
from pva_sae.rundir.paths import AnalysisPaths, RunDir
from pva_sae.stages.analyze import analyze
from pva_sae.stages.build import build_dataset
from pva_sae.stages.report import fmt_ci, fmt_p, write_report
from pva_sae.stages.steer import steer
from pva_sae.stages.validate import validate


def run_pipeline(cfg: Config, progress: bool = True) -> list[str]:
    """Run the stages; return human-readable summary lines (where the results are)."""

    run = RunDir.at(cfg.output.run_dir)
    lines = []
    started = time.perf_counter()
    records = build_dataset(cfg, progress=progress)
    n_pass = sum(r["passed"] for r in records)
    lines.append(f"build:   {len(records)} samples, {n_pass} passed ({n_pass / max(len(records), 1):.1%}) "
                 f"-> {run.datasets}")
    t0 = time.perf_counter()
    summary = analyze(cfg, progress=progress)
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
    results = validate(cfg, progress=progress)
    for direction in DIRECTIONS:
        rows = {r["name"]: r for r in results["validation"][direction]}
        lat, probe = rows["latent"], rows["probe"]
        trivial = max((rows["majority"], rows["always_positive"]), key=lambda r: r["metrics"]["f1"]["estimate"])
        m, pm, tm = lat["metrics"], probe["metrics"], trivial["metrics"]
        lines.append(f"validate: {lat['label']} -> {direction}: AUROC {fmt_ci(m['auroc'])}, F1 {fmt_ci(m['f1'])} "
                     f"(probe AUROC {fmt_ci(pm['auroc'])}; {trivial['label']} F1 {fmt_ci(tm['f1'])})")
    lines.append(f"         temperatures {', '.join(results['temperature'])}; {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    steering = steer(cfg, progress=progress)
    for name, e in steering["experiments"].items():
        rate, cs = e["rate"], e["controls_summary"]
        control = "n/a" if cs["mean_rate"] is None else f"{cs['mean_rate']:.1%}"
        share = "n/a" if rate["estimate"] is None else f"{rate['estimate']:.1%}"
        lines.append(f"steer:   {name} ({e['target']}, {e['direction']} direction): {rate['successes']}/{rate['n']} "
                     f"({share}) vs {e['n_controls']} controls {control}; rank p {fmt_p(e['rank_p']['p'])}, "
                     f"permutation p {fmt_p(e['permutation_p']['p'])} (Holm {fmt_p(e['holm_p']['permutation_p'])})")
    for direction, d in steering["directions"].items():
        lines.append(f"         net effect of {d['target']['label']} ({direction} direction): "
                     f"{fmt_ci(d['net_effect']['target'])} vs controls' mean {fmt_p(d['net_effect']['controls_mean'])}")
    lines.append(f"         noise floor {steering['noise_floor']['flips']}/{steering['noise_floor']['n']} flips; "
                 f"{time.perf_counter() - t0:.0f} s")
    html_path, _ = write_report(run.root)
    lines.append(f"report:  {html_path}")
    lines.append(f"finished in {time.perf_counter() - started:.0f} s; results in {run.root}")
    return lines

