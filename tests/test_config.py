import json

import pytest

from pva_sae.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    describe,
    diff_configs,
    resolve_config,
)


def test_defaults_are_valid_and_documented():
    cfg = Config().validate()
    assert cfg.generation.temperature == 0.0
    rows = describe()
    assert len(rows) > 30
    undocumented = [key for key, _, _, help_text in rows if not help_text.strip()]
    assert undocumented == []


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError) as exc:
        resolve_config(overrides=["generation.temprature=0.5"])
    msg = str(exc.value)
    assert "generation.temprature" in msg and "temperature" in msg and "max_new_tokens" in msg


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match="section one of"):
        resolve_config(overrides=["genration.temperature=0.5"])
    with pytest.raises(ConfigError, match="valid keys: "):
        config_from_dict({"modle": {}})


def test_overrides_are_typed():
    cfg = resolve_config(overrides=["generation.temperature=0.5", "generation.n_samples=3",
                                    "data.end_idx=None", "generation.sort_by_length=false",
                                    'generation.stop_strings=["\\nassert"]', "data.split_fractions=0.6,0.1,0.3"])
    assert cfg.generation.temperature == 0.5 and cfg.generation.n_samples == 3
    assert cfg.data.end_idx is None and cfg.generation.sort_by_length is False
    assert cfg.generation.stop_strings == ("\nassert",)
    assert cfg.data.split_fractions == (0.6, 0.1, 0.3)


@pytest.mark.parametrize("override, fragment", [
    ("generation.max_new_tokens=abc", "expected int"),
    ("generation.max_new_tokens=1.5", "expected int"),
    ("generation.temperature=-1", "temperature must be >= 0"),
    ("output.save_format=xml", "save_format"),
    ("checkpoint.resume=maybe", "checkpoint.resume"),
    ("data.split_fractions=0.5,0.5,0.5", "sum to 1"),
    ("generation.n_samples=3", "needs generation.temperature > 0"),
    ("prompt.template={text}", "lacks placeholder"),
    ("generation", "section.field=value"),
])
def test_bad_values_are_named(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("{", r"\{")):
        resolve_config(overrides=[override])


def test_file_then_overrides(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"generation": {"temperature": 1.0, "n_samples": 2}, "model": {"name": "x"}}))
    cfg = resolve_config(path, ["generation.n_samples=4"])
    assert (cfg.generation.temperature, cfg.generation.n_samples, cfg.model.name) == (1.0, 4, "x")
    toml = tmp_path / "cfg.toml"
    toml.write_text('[generation]\ntemperature = 0.5\n[data]\nend_idx = 9\n')
    cfg = resolve_config(toml)
    assert cfg.generation.temperature == 0.5 and cfg.data.end_idx == 9


def test_bad_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json is not valid"):
        resolve_config(bad)


def test_round_trip_and_diff():
    cfg = resolve_config(overrides=["generation.temperature=0.7", "generation.n_samples=2"])
    again = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert diff_configs(Config().to_dict(), cfg.to_dict()) == ["generation.n_samples", "generation.temperature"]


def test_apply_overrides_does_not_mutate_input():
    base = {"generation": {"temperature": 1}}
    apply_overrides(base, ["generation.temperature=2"])
    assert base == {"generation": {"temperature": 1}}
