"""Input fingerprints of stages: what each stage's outputs were made from, so that nothing is computed
from stale inputs.

Every stage marker (``stages/<stage>.done``) records ``inputs`` (digests of the upstream artifacts and
of the config sections the stage read) and ``outputs`` (digests of what it wrote). A stage checks
that the markers of the stages it reads from describe the artifacts that are on disk now
(:func:`check_upstream`) and refuses, naming what changed and the command that redoes it. A build that
writes a different dataset clears the markers downstream of it (:func:`invalidate_downstream`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pva_sae.config import diff_configs, with_defaults
from pva_sae.errors import StaleInputError
from pva_sae.hashing import sha256_file, sha256_json
from pva_sae.rundir.atomic import read_json
from pva_sae.rundir.paths import AnalysisPaths, RunDir, ValidationPaths

ORDER = ("build", "analyze", "validate", "steer")
# Settings of the analysis stage that later stages depend on (the SAE and what the latents were chosen from).
SAE_FIELDS = ("analysis.sae_release", "analysis.sae_width", "analysis.sae_l0", "analysis.sae_local_dir",
              "analysis.site", "analysis.layers", "analysis.general_max_frequency")


def file_digest(path: Path) -> str | None:
    return sha256_file(path) if Path(path).is_file() else None


def records_digest(run: RunDir) -> str | None:
    """Digest of the dataset as saved (the JSON file when present, else the Parquet file)."""
    return file_digest(run.dataset_json) or file_digest(run.dataset_parquet)


def sections_digest(config: dict[str, Any], sections: tuple[str, ...]) -> dict[str, str]:
    return {name: sha256_json(config.get(name)) for name in sections}


def marker(run: RunDir, stage: str) -> dict[str, Any]:
    return read_json(run.marker(stage)) if run.is_done(stage) else {}


def check_upstream(run: RunDir, stage: str, upstream: str, current: dict[str, Any]) -> None:
    """Refuse to run ``stage`` when ``upstream``'s recorded outputs differ from ``current`` (the digests of
    the artifacts on disk now): the upstream stage ran on other inputs than its marker says, or its output
    was replaced by another run."""
    recorded = marker(run, upstream).get("outputs", {})
    changed = [k for k, v in current.items() if k in recorded and recorded[k] != v]
    if changed:
        raise StaleInputError(
            f"{run.root}: the {upstream} stage's outputs changed since its marker was written ({', '.join(changed)}); "
            f"rerun `pva-sae {upstream} --run-dir {run.root}` before `pva-sae {stage}`, or `pva-sae run`")


def check_consumed(run: RunDir, stage: str, reader: str, key: str, current: str | None) -> None:
    """Refuse when ``reader``'s marker says it consumed another version of artifact ``key`` than ``current``."""
    consumed = marker(run, reader).get("inputs", {}).get(key)
    if consumed is not None and current is not None and consumed != current:
        raise StaleInputError(
            f"{run.root}: the {reader} stage was computed from another {key.replace('_', ' ')} than the one on disk "
            f"now (an upstream stage was rerun); rerun `pva-sae {reader} --run-dir {run.root}` before "
            f"`pva-sae {stage}`, or `pva-sae run`")


def current_digests(run: RunDir) -> dict[str, str | None]:
    """Digests of the artifacts later stages read, as they are on disk now."""
    a, v = AnalysisPaths.of(run), ValidationPaths.of(run)
    return {"records": records_digest(run), "activations": file_digest(a.activations), "scores": file_digest(a.scores),
            "ranked": file_digest(a.ranked_json), "choices": file_digest(v.choices), "results": file_digest(v.results)}


CHAIN = {  # stage: (upstream stage, the artifacts it wrote that later stages read)
    "build": ("records",), "analyze": ("activations", "scores", "ranked"), "validate": ("choices", "results"),
}


def check_chain(run: RunDir, stage: str) -> dict[str, str | None]:
    """Before ``stage`` runs: every upstream marker must describe the artifacts on disk, and every upstream
    stage must have consumed the current version of what it read. Returns the current digests."""
    now = current_digests(run)
    upstream = ORDER[:ORDER.index(stage)]
    for up in upstream:
        check_upstream(run, stage, up, {k: now[k] for k in CHAIN[up]})
    for reader in upstream[1:]:
        for earlier in upstream[:upstream.index(reader)]:
            for key in CHAIN[earlier]:
                check_consumed(run, stage, reader, key, now[key])
    return now


def check_run_config(run: RunDir, stage: str, config: dict[str, Any], fields: tuple[str, ...],
                     against: Path | None = None) -> None:
    """Refuse when ``config`` differs from the config an upstream stage ran with (``against``; by default the
    run's ``config.json``, what the dataset was built with) in any of ``fields`` (dotted names or whole
    sections), naming the differing fields: a later stage must not silently use another model, data, prompt or SAE than its inputs."""
    against = against or run.config
    if not against.is_file():
        return
    saved = with_defaults(read_json(against))
    sections = sorted({f.split(".")[0] for f in fields})
    differing = [k for k in diff_configs({s: saved.get(s) for s in sections}, {s: config.get(s) for s in sections})
                 if any(k == f or k.startswith(f + ".") for f in fields)]
    if differing:
        raise StaleInputError(
            f"{run.root} was made with other settings than this `pva-sae {stage}` uses: {', '.join(differing)} "
            f"differ from {against}. Use the run's settings (pass the same --model / --config / --set as the "
            f"stage that wrote it), or start a new run directory")


def invalidate_downstream(run: RunDir, stage: str) -> list[str]:
    """Clear the markers of every stage after ``stage``; returns the cleared ones."""
    cleared = []
    for later in ORDER[ORDER.index(stage) + 1:]:
        if run.is_done(later):
            run.clear_done(later)
            cleared.append(later)
    return cleared
