"""End-to-end validation stage on the tiny model: choices frozen before validation labels, robustness
sub-runs, report with every section."""

import json
import shutil
from html.parser import HTMLParser

import pytest

from pva_sae.config import resolve_config
from pva_sae.data.mbpp import seeded_subset as robustness_subset
from pva_sae.rundir.paths import RunDir, ValidationPaths
from pva_sae.stages.report import write_report
from pva_sae.stages.validate import validate

VALIDATION_SETTINGS = ["validation.temperatures=[0.0, 1.0]", "validation.samples_per_temperature=2",
                       "validation.robustness_max_tasks=5", "validation.bootstrap_resamples=50",
                       "validation.probe_folds=2", "validation.probe_cs=3"]


def copy_run(analysed, dest):
    cfg, run, _, _ = analysed
    shutil.copytree(run.root, dest)
    return with_run_dir(cfg, dest)


def with_run_dir(cfg, dest):
    data = cfg.to_dict()
    data["output"]["run_dir"] = str(dest)
    return resolve_config(overrides=[f"output.run_dir={dest}", "checkpoint.resume=auto"] + VALIDATION_SETTINGS,
                          base={k: v for k, v in data.items() if k != "validation"})


@pytest.fixture(scope="module")
def validated(analysed, tmp_path_factory):
    dest = tmp_path_factory.mktemp("validate") / "run"
    cfg = copy_run(analysed, dest)
    return cfg, RunDir.at(dest), validate(cfg, progress=False)


def test_results_structure(validated):
    cfg, run, res = validated
    paths = ValidationPaths.of(run)
    assert run.is_done("validate") and paths.choices.is_file() and paths.predictions.is_file()
    saved = json.loads(paths.results.read_text())
    assert saved["validation"] == res["validation"]
    for direction in ("correct", "incorrect"):
        names = [r["name"] for r in res["validation"][direction]]
        core = [n for n in names if n not in ("steered_latent", "confound")]
        assert core[:2] == ["latent", "latent_fires"]
        assert core[2:] in (["probe", "diff_means", "majority", "always_positive", "random"],
                            ["latent_fires", "probe", "diff_means", "majority", "always_positive", "random"])
        assert names.count("confound") == 3
        assert ("steered_latent" in names) == _differs(res, direction)   # the steered latent is validated too
        for r in res["validation"][direction]:
            assert set(r["metrics"]) == {"auroc", "f1", "precision", "recall", "average_precision", "mcc",
                                         "balanced_accuracy"}
            if r["name"] in ("latent", "steered_latent", "latent_fires"):
                against = {q["name"] for q in r["paired"]}
                assert {"probe", "diff_means", "majority", "always_positive", "random", "confound"} <= against
                assert all(q["verdict"] in ("better", "worse", "no different", "undefined") for q in r["paired"])
        fires = next(r for r in res["validation"][direction] if r["name"] == "latent_fires")
        assert fires["threshold"] > 0 and fires["threshold"] < 1e-300     # the natural JumpReLU rule
    splits = json.loads(run.splits.read_text())["splits"]
    built = {r["task_id"] for r in json.loads(run.dataset_json.read_text())["records"]}
    assert res["splits"]["validation"]["n"] == len(built & set(splits["validation"]))
    for name in ("roc_pr.png", "latent_histograms.png", "temperature.png", "difficulty.png"):
        assert (paths.plots / name).stat().st_size > 1000


def _differs(res, direction):
    choices = res["selection"][direction]
    steered = res["steering_selection"][direction]
    return (choices["layer"], choices["latent"]) != (steered["layer"], steered["latent"])


def test_temperature_subruns(validated):
    cfg, run, res = validated
    assert list(res["temperature"]) == ["0", "1"]
    t0, t1 = res["temperature"]["0"], res["temperature"]["1"]
    assert t0["source"].startswith("build stage") and t0["n_samples"] == t0["n_tasks"]
    assert t1["n_samples"] == 2 * t1["n_tasks"] and t1["n_tasks"] <= 5
    subs = list((ValidationPaths.of(run).root / "temperature").glob("t1_*"))
    assert len(subs) == 1
    sub = RunDir.at(subs[0])
    assert sub.is_done("build")
    records = json.loads(sub.dataset_json.read_text())["records"]
    assert {r["temperature"] for r in records} == {1.0} and {r["sample_index"] for r in records} == {0, 1}


def test_majority_baseline_and_one_class_handling(validated):
    _, _, res = validated
    # The random tiny model solves nothing at temperature 1: one class only, AUROC undefined, not a crash.
    rows = res["temperature"]["1"]["rows"]["correct"]
    assert res["temperature"]["1"]["pass_rate"]["estimate"] == 0.0
    assert all(r["metrics"]["auroc"]["estimate"] is None for r in rows)
    maj = [r for r in res["validation"]["incorrect"] if r["name"] == "majority"][0]
    assert maj["majority_class"] == "incorrect"        # 1 in 3 planted tasks pass
    assert maj["metrics"]["recall"]["estimate"] == 1.0


@pytest.mark.slow
def test_validation_labels_do_not_change_choices(validated, analysed, tmp_path):
    cfg, run, res = validated
    choices = json.loads(ValidationPaths.of(run).choices.read_text())
    assert set(choices["label_reads"]) == {"sae", "tuning"}
    dest = tmp_path / "flipped"
    cfg2 = copy_run(analysed, dest)
    dataset = json.loads((dest / "datasets" / "dataset.json").read_text())
    for r in dataset["records"]:
        if r["split"] == "validation":
            r["passed"] = not r["passed"]
    from conftest import replace_dataset

    from pva_sae.stages.analyze import analyze

    replace_dataset(RunDir.at(dest), dataset)
    analyze(with_analysis(cfg2, analysed), progress=False)   # the dataset changed, so the analysis is redone
    validate(cfg2, progress=False)
    flipped = json.loads(ValidationPaths.of(RunDir.at(dest)).choices.read_text())
    assert flipped == choices


def with_analysis(cfg, analysed):
    """``cfg`` with the analysis settings of the analysed fixture (the run's own SAE files and corpus)."""
    data = cfg.to_dict()
    data["analysis"] = analysed[0].to_dict()["analysis"]
    return resolve_config(base=data)


def test_bootstrap_reproducible(validated):
    cfg, run, res = validated
    again = validate(cfg, progress=False)
    assert again["validation"] == res["validation"] and again["temperature"] == res["temperature"]


def test_robustness_subset_is_seeded():
    ids = list(range(100))
    assert robustness_subset(ids, 0, 1) == ids
    assert robustness_subset(ids, 10, 1) == robustness_subset(ids, 10, 1) != robustness_subset(ids, 10, 2)


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.h2, self.imgs, self.text, self._in = [], [], [], None

    def handle_starttag(self, tag, attrs):
        self._in = tag
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        if self._in == "h2":
            self.h2.append(data)
        self.text.append(data)


def test_report_has_every_section_and_the_json_numbers(validated):
    import base64

    cfg, run, res = validated
    html_path, md_path = write_report(run.root)
    parser = _Collect()
    parser.feed(html_path.read_text())
    assert parser.h2 == ["Dataset", "Top latents (SAE-analysis split)", "Validation (held-out tasks)", "Robustness",
                         "Steering", "Reproducibility"]
    assert len(parser.imgs) >= 6 and all(src.startswith("data:image/png;base64,") for src in parser.imgs)
    assert all(base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n" for src in parser.imgs)
    text = " ".join(parser.text)
    lat = res["validation"]["correct"][0]["metrics"]["auroc"]
    assert f"{lat['estimate']:.3f} [{lat['low']:.3f}, {lat['high']:.3f}]" in text
    md = md_path.read_text()
    assert f"{lat['estimate']:.3f} [{lat['low']:.3f}, {lat['high']:.3f}]" in md
    assert "](validation/plots/roc_pr.png)" in md and "http" not in html_path.read_text().split("<body>")[1][:200]


def test_temperature_sub_builds_are_named_on_the_console(validated, capsys):
    cfg, run, res = validated
    validate(cfg, progress=True)
    err = capsys.readouterr().err
    assert "[validate] " in err and "temperatures 0, 1" in err
    assert "[build t=1] already complete: " in err
