"""Model registry, device/dtype choice and loading of any Hugging Face causal LM.

The registry is data (``assets/models.json``): a key names a hub repository or a directory inside
the package, with the shape the rest of pva-sae expects. ``model.name`` may also be a hub id or a
local directory in Hugging Face format; the loaded config is always the authority on the shape.

Gemma-2 needs care (see the checks below): eager attention (SDPA drops attention-logit
soft-capping), never float16 (activations overflow), and exactly one BOS token, which its tokenizer
adds itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import cached_file

from pva_sae.assets_index import PACKAGE_DIR, read_registry
from pva_sae.config import ModelConfig, resolve_config
from pva_sae.default.hub_fixture.cache import explain_missing
from pva_sae.default.hub_fixture.override import apply_override
from pva_sae.errors import PvaSaeError

log = logging.getLogger(__name__)

REGISTRY_FILE = "models.json"
BUILD_DEFAULT_HINT = "python scripts/train_default.py"

# owner/name with hub-legal characters; anything else that is not a registry key or an existing
# directory is reported as unknown rather than sent to the hub.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


class ModelLoadError(PvaSaeError, ValueError):
    """A model could not be resolved or loaded; the message says what to do."""


@dataclass
class LoadedModel:
    model: Any                 # transformers PreTrainedModel, in eval mode, on `device`
    tokenizer: Any             # left padding, pad token set
    name: str                  # model.name as given (registry key, hub id or path)
    source: str                # 'registry' | 'hub' | 'local'
    path_or_id: str            # hub id or absolute directory actually loaded
    revision: str              # hub commit sha, or 'sha256:<digest of the weight files>' for directories
    device: "torch.device"
    dtype: "torch.dtype"
    family: str                # config.model_type: 'gemma2', 'llama', ...
    n_layers: int
    d_model: int
    torch_threads: int = 0     # intra-op threads in use (recorded in the manifest)


# --------------------------------------------------------------------------- registry

def _registry() -> tuple[dict[str, Any], ...]:
    return apply_override(read_registry(REGISTRY_FILE, "models"), "models")


def list_models() -> list[dict[str, Any]]:
    """Every registry entry (copies), in registry order."""
    return [dict(entry) for entry in _registry()]


def registry_keys() -> list[str]:
    return [entry["key"] for entry in _registry()]


def registry_entry(name: str) -> dict[str, Any] | None:
    """The entry whose key or hub id is ``name``, or None (a local path or an unregistered hub id)."""
    for entry in _registry():
        if name in (entry["key"], entry.get("hf_id")):
            return dict(entry)
    return None


def model_config_defaults(name: str) -> dict[str, Any]:
    """Config values a registry entry sets for its model (e.g. a smaller robustness study for the CPU
    default), as a nested dict; a config file and ``--set`` overrides still win over them."""
    entry = registry_entry(name)
    return dict(entry.get("config_defaults") or {}) if entry else {}


def resolve_for_model(file: str | Path | None, overrides: list[str]):
    """resolve_config with the model's registered defaults under the file and overrides."""

    cfg = resolve_config(file, overrides)
    defaults = model_config_defaults(cfg.model.name)
    return resolve_config(file, overrides, base=defaults) if defaults else cfg


def packaged_path(entry: dict[str, Any]) -> Path:
    """Directory of a registry entry that ships inside the package (``path`` relative to it)."""
    return PACKAGE_DIR / entry["path"]


# --------------------------------------------------------------------------- device and dtype

def resolve_device(spec: str = "auto") -> "torch.device":
    """'auto' picks cuda, then mps, then cpu; an explicit device must exist on this machine."""

    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ModelLoadError(f"model.device={spec!r} is not a torch device; use 'auto', 'cpu', 'cuda', "
                             f"'cuda:N' or 'mps'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"model.device={spec!r} but CUDA is not available on this machine; "
                                 f"use model.device=auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(f"model.device={spec!r} but only {torch.cuda.device_count()} CUDA device(s) "
                                 f"exist (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if device.type == "mps" and not _mps_available():
        raise ModelLoadError(f"model.device={spec!r} but MPS is not available; use model.device=auto or cpu")
    return device


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_dtype(spec: str, device: "torch.device", family: str) -> "torch.dtype":
    """The weight/compute dtype for ``device`` and the model ``family``.

    'auto': bfloat16 on CUDA (float32 on GPUs without bfloat16), float32 on CPU, float16 on MPS
    except for Gemma-2, which gets float32 there: float16 overflows in Gemma-2's activations and
    MPS's bfloat16 support is partial, so float32 is the one safe choice (twice the memory).
    An explicit float16 for Gemma-2 is refused on every device for the same overflow reason.
    """

    name = DTYPES.get(spec.lower()) if spec != "auto" else _auto_dtype(device, family)
    if name is None:
        raise ModelLoadError(f"model.dtype={spec!r} is not supported; use auto, float32, bfloat16 or float16")
    if name == "float16" and family == "gemma2":
        raise ModelLoadError("model.dtype=float16 is refused for Gemma-2: its activations overflow float16 and "
                             "generations turn to garbage; use bfloat16 (GPU) or float32")
    return getattr(torch, name)


def _auto_dtype(device: "torch.device", family: str) -> str:
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if device.type == "mps":
        return "float32" if family == "gemma2" else "float16"
    return "float32"


# --------------------------------------------------------------------------- resolving model.name

@dataclass
class ModelSource:
    """Where ``model.name`` points."""

    kind: str                  # 'registry' | 'hub' | 'local'
    path_or_id: str
    revision: str | None       # hub revision to request; None for directories
    entry: dict[str, Any] | None

    @property
    def is_dir(self) -> bool:
        return self.revision is None


def resolve_source(cfg: ModelConfig) -> ModelSource:
    """Turn ``model.name`` into a directory or a hub id, or raise with the valid choices."""
    name = cfg.name
    entry = registry_entry(name) if name in registry_keys() else None
    if entry is not None:
        if "path" in entry:
            return ModelSource("registry", str(_packaged_dir(entry)), None, entry)
        revision = cfg.revision if cfg.revision != "main" else (entry.get("revision") or "main")
        return ModelSource("registry", entry["hf_id"], revision, entry)
    path = Path(name).expanduser()
    if path.exists():
        _check_local_dir(path)
        return ModelSource("local", str(path.resolve()), None, None)
    if HUB_ID.match(name):
        return ModelSource("hub", name, cfg.revision, registry_entry(name))
    if _looks_like_path(name):
        raise ModelLoadError(f"model directory {path.resolve()} does not exist; pass an existing directory in "
                             f"Hugging Face format, a hub id (owner/name) or a registry key "
                             f"({', '.join(registry_keys())})")
    raise ModelLoadError(f"unknown model {name!r}: not a registry key, an existing directory or a hub id "
                         f"(owner/name). Registry keys: {', '.join(registry_keys())} (see `pva-sae models`)")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _packaged_dir(entry: dict[str, Any]) -> Path:
    path = packaged_path(entry)
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"the embedded default model {entry['key']!r} is not built: {path} has no config.json. "
            f"Build it with `{BUILD_DEFAULT_HINT}`, or choose another model with model.name "
            f"(registry keys: {', '.join(registry_keys())})")
    return path


def _check_local_dir(path: Path) -> None:
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is a file; pass the directory holding config.json and the weights")
    if not (path / "config.json").is_file():
        nested = sorted(p.parent for p in path.glob("*/config.json"))
        hint = f" (did you mean {nested[0]}?)" if nested else ""
        raise ModelLoadError(f"model directory {path} has no config.json, so it is not a Hugging Face model "
                             f"directory{hint}; save one with model.save_pretrained(dir) and "
                             f"tokenizer.save_pretrained(dir)")


# --------------------------------------------------------------------------- weights

def weight_files(directory: str | Path) -> list[Path]:
    files = {p for pattern in WEIGHT_PATTERNS for p in Path(directory).glob(pattern)}
    return sorted(files)


def weights_digest(directory: str | Path) -> str:
    """'sha256:<hex>' over the weight files' names and bytes: the revision of a model directory.

    A directory has no commit to point at, so its content is its identity. This reads every weight
    byte (a few seconds for gemma-2-2b's 5 GB).
    """
    files = weight_files(directory)
    if not files:
        raise ModelLoadError(f"model directory {directory} has no weight files ({', '.join(WEIGHT_PATTERNS)})")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def find_corrupt_weight_file(directory: str | Path) -> tuple[Path, str] | None:
    """The first weight file whose safetensors header does not parse (truncated or overwritten), if any.

    Only headers are read, so this is cheap even for multi-GB checkpoints.
    """

    for path in weight_files(directory):
        if path.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as exc:  # safetensors raises its own error type for every header problem
            return path, str(exc)
    return None


def _corrupt_error(path: Path, why: str, source: ModelSource) -> ModelLoadError:
    fix = ("download it again (delete it from the Hugging Face cache first)" if not source.is_dir
           else "restore or re-save it")
    return ModelLoadError(f"weight file {path} is corrupted ({why}); {fix}")


# --------------------------------------------------------------------------- loading

def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load the model and tokenizer named by ``cfg`` onto the chosen device, ready for generation."""
    source = resolve_source(cfg)
    config = _load_config(source, cfg)
    family = config.model_type
    text_config = config.get_text_config()
    n_layers, d_model = text_config.num_hidden_layers, text_config.hidden_size
    if source.entry is not None:
        _check_against_registry(source.entry, family, n_layers, d_model)
    device = resolve_device(cfg.device)
    threads = set_torch_threads(cfg.torch_threads, device)
    dtype = resolve_dtype(cfg.dtype, device, family)
    if source.is_dir:
        _raise_if_corrupt(source.path_or_id, source)
    model = _load_weights(source, cfg, dtype, device, _attn_implementation(cfg.attn_implementation, family))
    tokenizer = _load_tokenizer(source, cfg)
    check_bos(tokenizer, family)
    revision = (weights_digest(source.path_or_id) if source.is_dir
                else getattr(config, "_commit_hash", None) or str(source.revision))
    log.info("loaded %s (%s, revision %s) on %s as %s", source.path_or_id, family, revision, device, dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, name=cfg.name, source=source.kind,
                       path_or_id=source.path_or_id, revision=revision, device=device, dtype=dtype,
                       family=family, n_layers=n_layers, d_model=d_model, torch_threads=threads)


def use_model(loaded: LoadedModel | Callable[[], LoadedModel] | None, cfg: ModelConfig) -> LoadedModel:
    """The model a stage works with: ``loaded`` when given (a LoadedModel, or a callable returning one, such as
    the memoised loader of `pva-sae run` that loads the model once for every stage), else ``cfg``'s model loaded
    now."""
    if loaded is None:
        return load_model(cfg)
    return loaded() if callable(loaded) else loaded


def load_once(cfg: ModelConfig) -> Callable[[], LoadedModel]:
    """A loader that loads ``cfg``'s model at its first call and returns that same model at every later one
    (nothing is loaded when it is never called)."""
    memo: list[LoadedModel] = []

    def load() -> LoadedModel:
        if not memo:
            memo.append(load_model(cfg))
        return memo[0]

    return load


def set_torch_threads(setting: int, device: "torch.device") -> int:
    """Apply model.torch_threads (0 = automatic, see its doc) and return the thread count in use."""
    if setting == 0 and device.type == "cpu":
        setting = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if setting > 0 and torch.get_num_threads() != setting:
        torch.set_num_threads(setting)
    return torch.get_num_threads()


def _hub_kwargs(source: ModelSource, cfg: ModelConfig) -> dict[str, Any]:
    if source.is_dir:
        return {}
    return {"revision": source.revision, "local_files_only": cfg.local_files_only}


def _hub_error(source: ModelSource, exc: Exception) -> ModelLoadError:
    missing = explain_missing(source.path_or_id, source.revision)
    name = source.entry["key"] if source.entry else source.path_or_id
    return ModelLoadError(
        f"could not load {source.path_or_id!r} (revision {source.revision}) from the Hugging Face hub or its "
        f"cache: {missing or exc}.\nGated models (Gemma, Llama) need their licence accepted on "
        f"https://huggingface.co/{source.path_or_id} and a token: `huggingface-cli login` (or set HF_TOKEN). "
        f"Then `pva-sae download --model {name}` fetches every file a run needs, and HF_HUB_OFFLINE=1 runs from "
        f"the cache afterwards. On a machine without network access, download elsewhere "
        f"(`hf download {source.path_or_id} --local-dir DIR`) and pass DIR as model.name, or copy a filled HF "
        f"cache and set model.local_files_only=true (or HF_HUB_OFFLINE=1).")


def _load_config(source: ModelSource, cfg: ModelConfig) -> Any:
    try:
        return AutoConfig.from_pretrained(source.path_or_id, **_hub_kwargs(source, cfg))
    except OSError as exc:
        if source.is_dir:
            raise ModelLoadError(f"could not read the config of {source.path_or_id}: {exc}") from exc
        raise _hub_error(source, exc) from exc
    except ValueError as exc:  # an unknown model_type, typically a transformers version too old for it
        raise ModelLoadError(f"{source.path_or_id}: {exc}. Upgrading transformers may help.") from exc


def _check_against_registry(entry: dict[str, Any], family: str, n_layers: int, d_model: int) -> None:
    """The loaded config wins; a mismatch means the registry entry is stale, which is worth a warning."""
    expected = (entry.get("family"), entry.get("n_layers"), entry.get("d_model"))
    if expected != (family, n_layers, d_model):
        log.warning("registry entry %r says family/n_layers/d_model = %s but the loaded config has %s; "
                    "using the config", entry["key"], expected, (family, n_layers, d_model))


def _attn_implementation(spec: str, family: str) -> str | None:
    if spec != "auto":
        return spec
    return "eager" if family == "gemma2" else None  # None: the library default


def _placement_kwargs(device: "torch.device") -> dict[str, Any]:
    """Load straight onto an accelerator when `accelerate` is installed (half the peak CPU memory)."""
    import importlib.util

    if device.type != "cpu" and importlib.util.find_spec("accelerate") is not None:
        return {"device_map": {"": device}}
    return {}


def _load_weights(source: ModelSource, cfg: ModelConfig, dtype: "torch.dtype", device: "torch.device",
                  attn: str | None) -> Any:

    kwargs: dict[str, Any] = {"dtype": dtype, **_hub_kwargs(source, cfg), **_placement_kwargs(device)}
    if attn is not None:
        kwargs["attn_implementation"] = attn
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path_or_id, **kwargs)
    except OSError as exc:
        if source.is_dir:
            raise ModelLoadError(f"could not load the weights in {source.path_or_id}: {exc}") from exc
        _raise_if_corrupt(_hub_snapshot_dir(source), source)
        raise _hub_error(source, exc) from exc
    except Exception as exc:
        bad = find_corrupt_weight_file(_weights_dir(source))
        if bad is not None:
            raise _corrupt_error(*bad, source) from exc
        raise
    if "device_map" not in kwargs:
        model = model.to(device)
    return model.eval()


def _raise_if_corrupt(directory: str | Path | None, source: ModelSource) -> None:
    if directory is None:
        return
    bad = find_corrupt_weight_file(directory)
    if bad is not None:
        raise _corrupt_error(*bad, source)


def _weights_dir(source: ModelSource) -> str | Path | None:
    return source.path_or_id if source.is_dir else _hub_snapshot_dir(source)


def _hub_snapshot_dir(source: ModelSource) -> Path | None:
    """The cache snapshot directory of a hub model (where its downloaded weights are), if cached."""

    try:
        path = cached_file(source.path_or_id, "config.json", revision=source.revision, local_files_only=True)
    except OSError:
        return None
    return Path(path).parent if path else None


def _load_tokenizer(source: ModelSource, cfg: ModelConfig) -> Any:
    """Left padding (the last prompt token sits at position -1 of every row) and a pad token."""

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path_or_id, **_hub_kwargs(source, cfg))
    except (OSError, ValueError) as exc:
        if source.is_dir:
            raise ModelLoadError(f"could not load a tokenizer from {source.path_or_id}: {exc}. The directory needs "
                                 f"the tokenizer files too (tokenizer.save_pretrained(dir))") from exc
        raise _hub_error(source, exc) from exc
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"the tokenizer of {source.path_or_id} has neither a pad nor an eos token, so "
                                 f"batches cannot be padded")
        log.info("tokenizer has no pad token; padding with eos %r", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_bos(tokenizer: Any, family: str) -> int:
    """Number of BOS tokens the tokenizer puts before a prompt (0 or 1), or raise.

    Two BOS tokens (a template adding one more) or, for Gemma-2, none at all, derail the model
    silently: Gemma-2's outputs degrade badly without its BOS.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return 0
    ids = tokenizer("def f():\n    return 1")["input_ids"]
    count = sum(1 for i in ids if i == bos)
    if count > 1 or (count == 1 and ids[0] != bos):
        raise ModelLoadError(f"the tokenizer adds {count} BOS token(s) (ids {ids[:4]}...); exactly one at the "
                             f"start is expected. Fix the tokenizer's post-processor or add_bos_token setting")
    if count == 0 and family == "gemma2":
        raise ModelLoadError("the Gemma-2 tokenizer adds no BOS token, and Gemma-2 needs exactly one; "
                             "set add_bos_token=True in tokenizer_config.json")
    return count
