"""Model registry, device/dtype choice and loading (CPU, tiny local model)."""

import shutil

import pytest
import torch

from pva_sae.config import ModelConfig
from pva_sae.model import registry as models
from pva_sae.model.registry import (
    ModelLoadError,
    check_bos,
    list_models,
    load_model,
    registry_entry,
    resolve_device,
    resolve_dtype,
    resolve_source,
    weights_digest,
)

# --------------------------------------------------------------------------- registry


def test_registry_has_the_expected_models():
    entries = {e["key"]: e for e in list_models()}
    assert {"pva-tiny", "gemma-2-2b", "gemma-2-9b", "gemma-2-2b-it", "gemma-2-9b-it", "llama-3.1-8b"} <= set(entries)
    assert (entries["gemma-2-2b"]["hf_id"], entries["gemma-2-2b"]["n_layers"], entries["gemma-2-2b"]["d_model"]) == (
        "google/gemma-2-2b", 26, 2304)
    assert (entries["gemma-2-9b"]["n_layers"], entries["gemma-2-9b"]["d_model"]) == (42, 3584)
    assert (entries["llama-3.1-8b"]["hf_id"], entries["llama-3.1-8b"]["family"]) == ("meta-llama/Llama-3.1-8B", "llama")
    assert entries["pva-tiny"]["path"] == "assets/default/model"
    for entry in entries.values():
        assert {"key", "family", "n_layers", "d_model", "revision", "notes"} <= set(entry)
        assert ("hf_id" in entry) != ("path" in entry)


def test_registry_entry_by_key_or_hub_id():
    assert registry_entry("gemma-2-2b")["hf_id"] == "google/gemma-2-2b"
    assert registry_entry("google/gemma-2-9b")["key"] == "gemma-2-9b"
    assert registry_entry("/some/dir") is None


def test_unknown_key_lists_registry_keys():
    with pytest.raises(ModelLoadError, match="unknown model 'gemma2b'.*gemma-2-2b.*llama-3.1-8b"):
        load_model(ModelConfig(name="gemma2b"))


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="no-such-model does not exist"):
        load_model(ModelConfig(name=str(tmp_path / "no-such-model")))


def test_directory_without_config_json(tmp_path, tiny_model_dir):
    shutil.copytree(tiny_model_dir, tmp_path / "outer" / "inner")
    with pytest.raises(ModelLoadError, match="has no config.json.*did you mean .*inner"):
        load_model(ModelConfig(name=str(tmp_path / "outer")))


def test_unbuilt_default_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "PACKAGE_DIR", tmp_path)
    with pytest.raises(ModelLoadError, match="python scripts/train_default.py"):
        load_model(ModelConfig(name="pva-tiny"))


def test_hub_sources_and_revisions():
    src = resolve_source(ModelConfig(name="gemma-2-2b"))
    assert (src.kind, src.path_or_id, src.revision) == ("registry", "google/gemma-2-2b", "main")
    assert resolve_source(ModelConfig(name="gemma-2-2b", revision="abc123")).revision == "abc123"
    src = resolve_source(ModelConfig(name="google/gemma-2-9b", revision="v1"))
    assert (src.kind, src.revision, src.entry["key"]) == ("hub", "v1", "gemma-2-9b")
    assert resolve_source(ModelConfig(name="someone/some-model")).entry is None


def test_packaged_default_loads_from_the_registry(tmp_path, monkeypatch, tiny_model_dir, caplog):
    shutil.copytree(tiny_model_dir, tmp_path / "assets" / "default" / "model")
    monkeypatch.setattr(models, "PACKAGE_DIR", tmp_path)
    models.log.addHandler(caplog.handler)  # the pva_sae logger may not propagate (see pva_sae.logs)
    try:
        lm = load_model(ModelConfig(name="pva-tiny", device="cpu"))
    finally:
        models.log.removeHandler(caplog.handler)
    assert (lm.name, lm.source, lm.revision) == ("pva-tiny", "registry", weights_digest(tiny_model_dir))
    assert (lm.n_layers, lm.d_model) == (2, 64)  # the loaded config wins over the registry ...
    assert "registry entry 'pva-tiny'" in caplog.text  # ... with a warning


def test_unreachable_hub_says_what_to_do():
    with pytest.raises(ModelLoadError) as info:
        load_model(ModelConfig(name="pva-sae-test/no-such-model", local_files_only=True))
    message = str(info.value)
    assert "pva-sae-test/no-such-model" in message and "local_files_only" in message and "hf download" in message


def test_corrupted_weights_are_named(tmp_path, tiny_model_dir):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=r"weight file .*model\.safetensors is corrupted"):
        load_model(ModelConfig(name=str(copy)))


# --------------------------------------------------------------------------- device and dtype


@pytest.fixture
def fake_accelerators(monkeypatch):
    def set_available(cuda=False, mps=False, n_cuda=1, bf16=True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n_cuda if cuda else 0)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    return set_available


@pytest.mark.parametrize("cuda,mps,expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_device_prefers_cuda_then_mps(fake_accelerators, cuda, mps, expected):
    fake_accelerators(cuda=cuda, mps=mps)
    assert resolve_device("auto").type == expected


def test_explicit_devices_are_checked(fake_accelerators):
    fake_accelerators(cuda=False)
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        resolve_device("cuda")
    fake_accelerators(cuda=True, n_cuda=2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ModelLoadError, match="only 2 CUDA device"):
        resolve_device("cuda:2")
    with pytest.raises(ModelLoadError, match="not a torch device"):
        resolve_device("gpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("device,family,bf16,expected", [
    ("cuda", "gemma2", True, torch.bfloat16),
    ("cuda", "llama", True, torch.bfloat16),
    ("cuda", "gemma2", False, torch.float32),
    ("mps", "gemma2", True, torch.float32),
    ("mps", "llama", True, torch.float16),
    ("cpu", "gemma2", True, torch.float32),
])
def test_auto_dtype(fake_accelerators, device, family, bf16, expected):
    fake_accelerators(cuda=True, bf16=bf16)
    assert resolve_dtype("auto", torch.device(device), family) == expected


def test_explicit_dtypes():
    cuda = torch.device("cuda")
    assert resolve_dtype("bf16", cuda, "gemma2") == torch.bfloat16
    assert resolve_dtype("float16", cuda, "llama") == torch.float16
    with pytest.raises(ModelLoadError, match="float16 is refused for Gemma-2"):
        resolve_dtype("float16", cuda, "gemma2")
    with pytest.raises(ModelLoadError, match="not supported"):
        resolve_dtype("int8", cuda, "llama")


# --------------------------------------------------------------------------- loading


def test_load_local_dir(tiny_loaded, tiny_model_dir):
    lm = tiny_loaded
    assert (lm.source, lm.path_or_id, lm.family, lm.n_layers, lm.d_model) == (
        "local", str(tiny_model_dir.resolve()), "gemma2", 2, 64)
    assert lm.revision == weights_digest(tiny_model_dir) and lm.revision.startswith("sha256:")
    assert (lm.device, lm.dtype, lm.model.dtype) == (torch.device("cpu"), torch.float32, torch.float32)
    assert lm.model.config._attn_implementation == "eager"
    assert not lm.model.training


def test_tokenizer_pads_left_and_adds_one_bos(tiny_loaded):
    tok = tiny_loaded.tokenizer
    enc = tok(["x = 1", "def long_function_name(a, b):\n    return a"], padding=True, return_tensors="pt")
    assert tok.padding_side == "left"
    assert enc["attention_mask"][0, 0] == 0 and enc["attention_mask"][0, -1] == 1
    for ids, mask in zip(enc["input_ids"], enc["attention_mask"]):
        real = ids[mask.bool()].tolist()
        assert real[0] == tok.bos_token_id and real.count(tok.bos_token_id) == 1
    assert check_bos(tok, "gemma2") == 1


def test_missing_pad_token_falls_back_to_eos(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    copy = shutil.copytree(tiny_model_dir, tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(copy)
    tok.pad_token = None
    tok.save_pretrained(copy)
    lm = load_model(ModelConfig(name=str(copy)))
    assert lm.tokenizer.pad_token_id == lm.tokenizer.eos_token_id


class _StubTokenizer:
    bos_token_id = 2

    def __init__(self, ids):
        self.ids = ids

    def __call__(self, text):
        return {"input_ids": self.ids}


def test_bos_check_refuses_double_or_missing_bos():
    with pytest.raises(ModelLoadError, match="adds 2 BOS"):
        check_bos(_StubTokenizer([2, 2, 50, 51]), "llama")
    with pytest.raises(ModelLoadError, match="adds no BOS"):
        check_bos(_StubTokenizer([50, 51]), "gemma2")
    assert check_bos(_StubTokenizer([50, 51]), "gpt2") == 0
