"""The run another run transfers from (``validation.transfer_from``): its frozen choices and alphas.

:func:`transfer_base` reads a finished run and refuses, naming the difference and the fix, when its
choices cannot be applied to this run unchanged: it is not a finished run, it is this run, its SAEs
differ (release, width, L0, site, or the files' sha256 where both analyses recorded them), this run's
analysis does not cover the chosen layers, or the residual widths differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pva_sae.errors import InputError, MissingInputError
from pva_sae.rundir.artifacts import (
    read_analysis_summary,
    read_choices,
    read_predictor_weights,
    read_splits,
    read_validation_results,
)
from pva_sae.rundir.atomic import read_json
from pva_sae.rundir.fingerprints import file_digest, marker
from pva_sae.rundir.paths import AnalysisPaths, RunDir, SteeringPaths, ValidationPaths

# Settings of the analysis that must agree for one run's latents to mean the same in another.
SAE_SETTINGS = ("sae_width", "sae_l0", "site")


@dataclass(frozen=True)
class TransferBase:
    """A finished run whose choices another run applies unchanged."""

    run: RunDir
    choices: dict[str, Any]
    weights: dict[str, dict[str, Any]]
    validation: dict[str, Any]
    steering: dict[str, Any] | None
    config: dict[str, Any]
    manifest: dict[str, Any]
    splits: dict[str, list[int]]
    release: str

    def chosen_layers(self) -> list[int]:
        rows = list(self.choices["selection"].values()) + list(self.choices["steering_selection"].values())
        return sorted({int(r["layer"]) for r in rows})

    def describe(self) -> dict[str, Any]:
        """What this run took from the base run, for its outputs and report."""
        model = self.manifest.get("model", {})
        return {"base_run": str(self.run.root), "base_model": model.get("name"),
                "base_model_revision": model.get("revision"),
                "base_dataset": self.config["data"].get("dataset", "mbpp"),
                "sae_release": self.release, "base_choices_sha256": file_digest(ValidationPaths.of(self.run).choices),
                "base_weights_sha256": file_digest(ValidationPaths.of(self.run).weights)}

    def alpha(self, direction: str) -> dict[str, Any]:
        """The steering coefficient the base run chose for ``direction`` (in its units and absolute)."""
        target = self.steering["directions"][direction]["target"]
        return {"alpha": target["alpha"], "alpha_abs": target["alpha_abs"], "alpha_units": target["alpha_units"],
                "normalize": target["normalize"], "latent": target["latent"], "layer": target["layer"]}


def transfer_base(path: str | Path, run: RunDir, this_config: dict[str, Any], *,
                  need_steering: bool = False) -> TransferBase:
    """The run at ``path``, checked against ``run`` (this run, whose analysis stage has finished)."""
    base = RunDir.at(path)
    if base.root == run.root:
        raise InputError(f"validation.transfer_from is this run directory ({run.root}); name the run to transfer from")
    vpaths = ValidationPaths.of(base)
    if not base.config.is_file() or not base.is_done("validate") or not vpaths.choices.is_file():
        raise MissingInputError(f"validation.transfer_from={path}: {base.root} is not a run with a finished validation "
                                f"stage; run `pva-sae run --run-dir {base.root}` (or build, analyze, validate) first")
    steering = None
    if need_steering:
        spaths = SteeringPaths.of(base)
        if not base.is_done("steer") or not spaths.results.is_file():
            raise MissingInputError(f"validation.transfer_from={path}: {base.root} has no finished steering stage, "
                                    f"whose alphas this one reuses; run `pva-sae steer --run-dir {base.root}` first")
        steering = read_json(spaths.results)
    out = TransferBase(run=base, choices=read_choices(vpaths), weights=read_predictor_weights(vpaths),
                       validation=read_validation_results(vpaths), steering=steering, config=read_json(base.config),
                       manifest=read_json(base.manifest) if base.manifest.is_file() else {}, splits=read_splits(base),
                       release=read_analysis_summary(AnalysisPaths.of(base))["release"])
    _check_compatible(out, run, this_config)
    return out


def _check_compatible(base: TransferBase, run: RunDir, this_config: dict[str, Any]) -> None:
    here = read_analysis_summary(AnalysisPaths.of(run))
    problems = []
    if here["release"] != base.release:
        problems.append(f"SAE release {base.release!r} there, {here['release']!r} here")
    base_analysis = read_json(AnalysisPaths.of(base.run).config)["analysis"]
    for name in SAE_SETTINGS:
        there, here_value = base_analysis.get(name), this_config["analysis"].get(name)
        if there != here_value:
            problems.append(f"analysis.{name} {there!r} there, {here_value!r} here")
    if base.release == "local" and base_analysis.get("sae_local_dir") != this_config["analysis"].get("sae_local_dir"):
        problems.append("other local SAE directories (analysis.sae_local_dir)")
    missing = [layer for layer in base.chosen_layers() if layer not in here["layers"]]
    if missing:
        problems.append(f"the chosen latents' layers {missing} are not analysed here "
                        f"(analysis.layers {here['layers']})")
    base_sae = marker(base.run, "analyze").get("inputs", {}).get("sae", {})
    this_sae = marker(run, "analyze").get("inputs", {}).get("sae", {})
    differing = [layer for layer in base.chosen_layers()
                 if None not in (base_sae.get(str(layer)), this_sae.get(str(layer)))
                 and base_sae[str(layer)] != this_sae[str(layer)]]
    if differing:
        problems.append(f"the SAE files of layer(s) {differing} differ (sha256)")
    base_width = base.manifest.get("model", {}).get("d_model")
    this_manifest = read_json(run.manifest) if run.manifest.is_file() else {}
    this_width = this_manifest.get("model", {}).get("d_model")
    if base_width and this_width and base_width != this_width:
        problems.append(f"residual width d_model {base_width} there, {this_width} here")
    if problems:
        raise InputError(f"cannot transfer from {base.run.root}: {'; '.join(problems)}. Transfer needs the same SAEs "
                         "at the same site: analyse this run with the base run's analysis settings (--sae-release, "
                         "--set analysis.layers=...), or transfer from a run made with these")
