"""The plain-text summary lines of a stage's results, as the CLI prints them, the report and the Python API show
them: number and interval formatting, one line per validated latent, one per steering experiment."""

from __future__ import annotations

from typing import Any

from pva_sae.config import DIRECTIONS
from pva_sae.plots import fmt_p


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def fmt_ci(interval: dict[str, Any] | None, digits: int = 3) -> str:
    """'0.712 [0.650, 0.770]' from an interval dict; 'n/a' where undefined."""
    if not interval or interval.get("estimate") is None:
        return "n/a"
    low, high = bounds(interval)
    if low is None:
        return fmt(interval["estimate"], digits)
    return f"{fmt(interval['estimate'], digits)} [{fmt(low, digits)}, {fmt(high, digits)}]"


def bounds(interval: dict[str, Any]) -> tuple[float | None, float | None]:
    low, high = interval["ci"] if "ci" in interval else (interval.get("low"), interval.get("high"))
    return low, high


def validation_summary(results: dict[str, Any]) -> list[str]:
    """One line per validated latent: AUROC and F1 with intervals, the probe's, the best trivial F1, and the
    verdict of the paired AUROC difference against the probe."""
    lines = []
    for direction in DIRECTIONS:
        rows = results["validation"][direction]
        by = {r["name"]: r for r in rows}
        probe = by["probe"]
        trivial = max((by["majority"], by["always_positive"]), key=lambda r: r["metrics"]["f1"]["estimate"])
        for lat in [r for r in rows if r["name"] in ("latent", "steered_latent")]:
            vs = next(q for q in lat["paired"] if q["name"] == "probe")
            m = lat["metrics"]
            role = "steered latent" if lat["name"] == "steered_latent" else "latent"
            lines.append(f"{role} L{lat['layer']}:{lat['latent']} -> {direction}: AUROC {fmt_ci(m['auroc'])}, F1 "
                         f"{fmt_ci(m['f1'])} (probe AUROC {fmt_ci(probe['metrics']['auroc'])}: {VERSUS[vs['verdict']]} the "
                         f"probe; {trivial['label']} F1 {fmt_ci(trivial['metrics']['f1'])})")
    return lines


VERSUS = {"better": "better than", "worse": "worse than", "no different": "no different from",
          "undefined": "not comparable with"}


def steering_summary(results: dict[str, Any]) -> list[str]:
    """One line per experiment (target vs its controls, rank and permutation p) and per direction (net effect)."""
    lines = []
    for name, e in results["experiments"].items():
        rate, cs = e["rate"], e["controls_summary"]
        control = "n/a" if cs["mean_rate"] is None else f"{cs['mean_rate']:.1%}"
        share = "n/a" if rate["estimate"] is None else f"{rate['estimate']:.1%}"
        lines.append(f"{name} ({e['target']}, {e['direction']} direction): {rate['successes']}/{rate['n']} ({share}) "
                     f"vs {e['n_controls']} controls {control}; rank p {fmt_p(e['rank_p']['p'])}, permutation p "
                     f"{fmt_p(e['permutation_p']['p'])} (Holm {fmt_p(e['holm_p']['permutation_p'])})")
    for direction, d in results["directions"].items():
        lines.append(f"net effect of {d['target']['label']} ({direction} direction): "
                     f"{fmt_ci(d['net_effect']['target'])} vs controls' mean {fmt(d['net_effect']['controls_mean'])}")
    return lines
