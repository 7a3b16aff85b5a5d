"""SAE file formats: GemmaScope ``params.npz``, LlamaScope / lm-saes ``.safetensors``, SAELens objects.

``load_sae_file`` reads one file, checks it (keys, shapes, finite values, ``d_model``) and returns a
:class:`~pva_sae.sae.jumprelu.JumpReLUSAE` or :class:`~pva_sae.sae.topk.TopKSAE` in the convention of
:mod:`pva_sae.sae.base`. LlamaScope checkpoints are not stored in that convention; their preprocessing
is folded into the weights so that every loaded SAE takes raw residuals (see ``_llamascope_tensors``).
Finding the file of a (release, layer) is :mod:`pva_sae.sae.registry`'s job.
"""

from __future__ import annotations

import json
import logging
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pva_sae.hashing import sha256_file
from pva_sae.sae.base import SAE, SAEError, as_float32, expect_shape
from pva_sae.sae.jumprelu import JumpReLUSAE
from pva_sae.sae.topk import TopKSAE

log = logging.getLogger(__name__)

GEMMASCOPE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
LLAMASCOPE_KEYS = ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias")
# Optional tensors that OpenMOSS lm-saes checkpoints may carry besides the four Linear weights.
LLAMASCOPE_OPTIONAL = ("log_jumprelu_threshold",)
LLAMASCOPE_NORM_PREFIX = "dataset_average_activation_norm."
# How a scalar hyperparams ``jump_relu_threshold`` is read: "lm-saes" compares it with the training-space
# pre-activation (times decoder norms when configured); "saelens" with pre / s_in, decoder norms ignored,
# as SAELens converts the released LlamaScope files (see ``_llamascope_tensors``).
THRESHOLD_CONVENTIONS = ("lm-saes", "saelens")

# Decoder rows further than this from unit norm are reported with a warning at load time.
DECODER_NORM_TOLERANCE = 0.05


# --------------------------------------------------------------------------- GemmaScope params.npz


def save_gemmascope_npz(path: str | Path, W_enc, W_dec, b_enc, b_dec, threshold) -> Path:
    """Write an SAE in GemmaScope's ``params.npz`` layout: five float32 arrays, keys as in ``GEMMASCOPE_KEYS``.

    Shapes: ``W_enc (d_model, d_sae)``, ``W_dec (d_sae, d_model)``, ``b_enc (d_sae,)``,
    ``b_dec (d_model,)``, ``threshold (d_sae,)``. Accepts numpy arrays or torch tensors.
    """

    arrays = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec, "threshold": threshold}
    arrays = {k: _to_numpy32(v) for k, v in arrays.items()}
    d_model, d_sae = arrays["W_enc"].shape
    for key, want in (("W_dec", (d_sae, d_model)), ("b_enc", (d_sae,)), ("b_dec", (d_model,)),
                      ("threshold", (d_sae,))):
        expect_shape(key, arrays[key].shape, want)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object keeps numpy from appending '.npz' to other names
        np.savez(f, **arrays)
    return path


def _to_numpy32(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.ascontiguousarray(np.asarray(value, dtype=np.float32))


def _read_npz(path: Path) -> dict[str, Any]:
    """{key: float32 numpy array} from a params.npz; unreadable archives raise SAEError."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise SAEError(f"{path} is not a readable .npz archive ({type(exc).__name__}: {exc}); the file is "
                       f"probably truncated or corrupted: delete it and download it again") from exc


def _check_keys(path: Path, got: set[str], required: tuple[str, ...], optional: tuple[str, ...] = (),
                optional_prefix: str | None = None) -> None:
    missing = [k for k in required if k not in got]
    extra = sorted(k for k in got if k not in required and k not in optional
                   and not (optional_prefix and k.startswith(optional_prefix)))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected {', '.join(extra)}")
        raise SAEError(f"{path} has the wrong keys ({'; '.join(parts)}); expected exactly "
                       f"{', '.join(required)}: not an SAE file of this format, or a different SAE library's export")


# --------------------------------------------------------------------------- LlamaScope safetensors


def _llamascope_tensors(state: dict[str, Any], hp: dict[str, Any] | None, k: int | None,
                        path: Path, threshold_convention: str = "lm-saes",
                        ) -> tuple[type[SAE], dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Convert an OpenMOSS lm-saes / LlamaScope checkpoint to our convention, folding its preprocessing.

    Source of every rule: OpenMOSS/Language-Model-SAEs ``src/lm_saes/sae.py`` (``encode``,
    ``compute_norm_factor``, ``standardize_parameters_of_dataset_norm``) and ``config.py`` defaults:

    * ``x' = x * s_in`` with ``s_in = sqrt(d_model) / norm_in`` for ``norm_activation == 'dataset-wise'``;
    * ``x' = x' - b_dec`` when ``apply_decoder_bias_to_pre_encoder`` (default True; LlamaScope: False);
    * ``pre = x' @ encoder.weight.T + encoder.bias``;
    * sparsity decisions use ``pre * ||decoder column||`` when ``sparsity_include_decoder_norm``
      (default True), activations keep ``pre``;
    * reconstruction in model units ``= (acts @ decoder.weight.T + decoder.bias) / s_out``.

    Folded: ``W_enc = s_in * E.T``, ``b_enc = b - b_dec @ E.T`` (when subtracted),
    ``W_dec = D.T / s_out``, ``b_dec = c / s_out``; a JumpReLU threshold ``theta`` on ``pre * n_i``
    becomes ``theta / n_i`` on ``pre`` (``n_i`` = decoder norm before folding).
    With ``threshold_convention == "saelens"`` a scalar ``jump_relu_threshold`` is in inference units
    (inputs not rescaled) and decoder norms play no part: fire when ``pre > theta * s_in``. This is
    SAELens' ``llama_scope`` conversion, whose threshold scaling the LlamaScope authors contributed
    (SAELens PR #483, "Fix abnormally large llamascope L0"); the registered LlamaScope release uses it.
    Returns (SAE class, tensors dict, extra kwargs, preprocessing record).
    """
    if threshold_convention not in THRESHOLD_CONVENTIONS:
        raise SAEError(f"threshold_convention {threshold_convention!r} is not one of "
                       f"{', '.join(THRESHOLD_CONVENTIONS)}")
    hp = dict(hp or {})
    enc_w, enc_b = as_float32(state["encoder.weight"]), as_float32(state["encoder.bias"])   # (d_sae, d_model), (d_sae,)
    dec_w, dec_b = as_float32(state["decoder.weight"]), as_float32(state["decoder.bias"])   # (d_model, d_sae), (d_model,)
    d_sae, d_model = enc_w.shape
    expect_shape("encoder.bias", tuple(enc_b.shape), (d_sae,))
    expect_shape("decoder.weight", tuple(dec_w.shape), (d_model, d_sae))
    expect_shape("decoder.bias", tuple(dec_b.shape), (d_model,))
    s_in, s_out, norm_mode = _llamascope_scales(state, hp, d_model, path)
    subtract_b_dec = bool(hp.get("apply_decoder_bias_to_pre_encoder", True)) if hp else False
    include_dec_norm = bool(hp.get("sparsity_include_decoder_norm", True)) if hp else False
    dec_norms = dec_w.norm(dim=0)                                                 # (d_sae,)

    W_enc = enc_w.T * s_in                                                        # (d_model, d_sae)
    b_enc = enc_b - (dec_b @ enc_w.T if subtract_b_dec else 0.0)                  # (d_sae,)
    tensors = {"W_enc": W_enc, "W_dec": dec_w.T / s_out, "b_enc": b_enc, "b_dec": dec_b / s_out}
    act_fn = str(hp.get("act_fn", "topk" if not hp else "relu")).lower()
    record = {"format": "llamascope", "act_fn": act_fn, "norm_activation": norm_mode, "input_scale": s_in,
              "output_scale": s_out, "subtract_b_dec_before_encoder": subtract_b_dec,
              "sparsity_include_decoder_norm": include_dec_norm, "hyperparams_found": bool(hp)}

    if act_fn == "jumprelu":
        if "log_jumprelu_threshold" in state:
            theta = as_float32(state["log_jumprelu_threshold"]).exp()
        elif "jump_relu_threshold" in hp:
            theta = torch.full((d_sae,), float(hp["jump_relu_threshold"]))
            if threshold_convention == "saelens":
                theta, include_dec_norm = theta * s_in, False
                record.update(sparsity_include_decoder_norm=False, threshold_convention="saelens")
        else:
            raise SAEError(f"{path}: act_fn is 'jumprelu' but neither a log_jumprelu_threshold tensor nor "
                           f"hyperparams jump_relu_threshold is given; supply the release's hyperparams.json")
        if include_dec_norm:
            theta = theta / dec_norms  # pre * n_i > theta  <=>  pre > theta / n_i  (n_i > 0; dead rows -> inf)
        record["threshold_mean"] = float(theta[torch.isfinite(theta)].mean()) if torch.isfinite(theta).any() else None
        return JumpReLUSAE, {**tensors, "threshold": theta}, {}, record
    if act_fn == "relu":
        return JumpReLUSAE, {**tensors, "threshold": torch.zeros(d_sae)}, {}, record
    if act_fn == "topk":
        top_k = hp.get("top_k", k)
        if top_k is None:
            raise SAEError(f"{path}: a TopK SAE needs k; pass k=... or supply the release's hyperparams.json")
        record["k"] = int(top_k)
        return TopKSAE, tensors, {"k": int(top_k), "rank_scale": dec_norms if include_dec_norm else None}, record
    raise SAEError(f"{path}: act_fn {act_fn!r} is not supported (supported: jumprelu, topk, relu)")


def _llamascope_scales(state, hp, d_model: int, path: Path) -> tuple[float, float, str]:
    """(s_in, s_out, mode) of the dataset-wise activation normalisation (1, 1 when none applies)."""
    norms = dict(hp.get("dataset_average_activation_norm") or {})
    for key, value in state.items():  # newer lm-saes checkpoints carry the norms as scalar tensors
        if key.startswith(LLAMASCOPE_NORM_PREFIX):
            hook = key[len(LLAMASCOPE_NORM_PREFIX):]
            role = "in" if hook == hp.get("hook_point_in", hook) else "out"
            norms.setdefault(role, float(value))
    # lm-saes defaults to 'token-wise' when the key is absent; a file that lists norms but no mode is
    # read as dataset-wise, one with neither as already standardised ('inference').
    mode = hp.get("norm_activation", "dataset-wise" if norms else "inference") if hp else (
        "dataset-wise" if norms else "none")
    if mode in ("inference", "none"):
        return 1.0, 1.0, mode
    if mode != "dataset-wise":
        raise SAEError(f"{path}: norm_activation {mode!r} normalises every input by its own norm, which "
                       f"cannot be folded into the weights; only 'dataset-wise' and 'inference' are supported")
    if "in" not in norms:
        raise SAEError(f"{path}: norm_activation is 'dataset-wise' but dataset_average_activation_norm "
                       f"has no 'in' value; supply the release's hyperparams.json")
    s_in = math.sqrt(d_model) / float(norms["in"])
    s_out = math.sqrt(d_model) / float(norms.get("out", norms["in"]))
    return s_in, s_out, mode


def _find_hyperparams(path: Path) -> dict[str, Any] | None:
    """hyperparams.json of a LlamaScope checkpoint: beside ``checkpoints/`` (the repo layout) or beside the file."""
    for candidate in (path.parent.parent / "hyperparams.json", path.parent / "hyperparams.json"):
        if candidate.is_file():
            return read_hyperparams(candidate)
    return None


def read_hyperparams(path: Path) -> dict[str, Any]:
    """A hyperparams.json as a dict; an unreadable file raises an ``SAEError`` saying to download it again."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise SAEError(f"could not read {path} ({exc}); delete it and download it again") from exc


# --------------------------------------------------------------------------- loading a file


def load_sae_file(path: str | Path, expected_d_model: int | None = None, *, hyperparams: dict[str, Any] | None = None,
                  k: int | None = None, threshold_convention: str = "lm-saes") -> SAE:
    """Read and check one SAE file: GemmaScope ``.npz`` or LlamaScope / lm-saes ``.safetensors``.

    ``.safetensors`` files holding GemmaScope's five keys are read like a params.npz. LlamaScope files
    take their activation and scaling from ``hyperparams`` (or a hyperparams.json found beside
    ``checkpoints/``); without one a TopK SAE with ``k`` and no scaling is built, with a warning.
    ``threshold_convention`` says how their scalar JumpReLU threshold is read (``THRESHOLD_CONVENTIONS``).

    Checks, each failing with an ``SAEError`` that says what to do: the file exists and is readable;
    exactly the expected keys (missing and unexpected ones are named); consistent shapes; finite
    values; ``d_model == expected_d_model`` when given. Decoder-row norms are summarised in ``meta``
    and logged as a warning when far from 1.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise SAEError(f"SAE file {path} does not exist; check the path, or load by release with "
                       f"load_sae(release, layer, local_dir=...) or from the hub")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        arrays = _read_npz(path)
        _check_keys(path, set(arrays), GEMMASCOPE_KEYS)
        cls, tensors, kwargs, record = JumpReLUSAE, {k_: as_float32(v) for k_, v in arrays.items()}, {}, {
            "format": "gemmascope"}
    elif suffix == ".safetensors":
        state = _read_safetensors(path)
        if set(GEMMASCOPE_KEYS) <= set(state):
            _check_keys(path, set(state), GEMMASCOPE_KEYS)
            cls, tensors, kwargs, record = JumpReLUSAE, state, {}, {"format": "gemmascope"}
        else:
            _check_keys(path, set(state), LLAMASCOPE_KEYS, LLAMASCOPE_OPTIONAL, LLAMASCOPE_NORM_PREFIX)
            hp = hyperparams if hyperparams is not None else _find_hyperparams(path)
            if hp is None:
                log.warning("%s: no hyperparams.json found beside checkpoints/; assuming a TopK SAE (k=%s) on raw "
                            "inputs, without the dataset-wise input scaling LlamaScope uses", path, k)
            cls, tensors, kwargs, record = _llamascope_tensors(state, hp, k, path, threshold_convention)
    else:
        raise SAEError(f"{path}: unsupported SAE file type {suffix!r}; expected a GemmaScope params.npz "
                       f"or a LlamaScope .safetensors checkpoint")
    _check_gemmascope_shapes(path, tensors)
    _check_finite(path, tensors)
    sae = cls(**tensors, **kwargs)
    if expected_d_model is not None and sae.d_model != int(expected_d_model):
        raise SAEError(f"SAE expects d_model {sae.d_model} but the model has {expected_d_model}: "
                       f"wrong release for this model? ({path})")
    sae.meta.update({"path": str(path), "sha256": sha256_file(path), "arch": sae.arch, "d_model": sae.d_model,
                     "d_sae": sae.d_sae, **_decoder_norm_summary(sae, path), "preprocessing": record})
    if isinstance(sae, TopKSAE):
        sae.meta["k"] = sae.k
    return sae


def _read_safetensors(path: Path) -> dict[str, Any]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SAEError(f"{path} is not a readable .safetensors file ({type(exc).__name__}: {exc}); it is "
                       f"probably truncated or corrupted: delete it and download it again") from exc


def _check_gemmascope_shapes(path: Path, tensors: dict[str, Any]) -> None:
    """Shapes against W_enc (d_model, d_sae), naming the offending key and the file."""
    W_enc = tensors["W_enc"]
    if W_enc.dim() != 2:
        raise SAEError(f"{path}: W_enc has shape {tuple(W_enc.shape)}, expected 2 dimensions (d_model, d_sae)")
    d_model, d_sae = W_enc.shape
    want = {"W_dec": (d_sae, d_model), "b_enc": (d_sae,), "b_dec": (d_model,), "threshold": (d_sae,)}
    for key, shape in want.items():
        if key in tensors and tuple(tensors[key].shape) != shape:
            raise SAEError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, expected {shape} given W_enc "
                           f"{(d_model, d_sae)}: the file is corrupted or not an SAE of this layout")


def _check_finite(path: Path, tensors: dict[str, Any]) -> None:
    for key, value in tensors.items():
        if key == "threshold":
            bad = int(torch.isnan(value).sum())  # +inf thresholds mark dead latents (zero decoder rows)
        else:
            bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise SAEError(f"{path}: {key} has {bad} non-finite values (NaN/inf); the file is corrupted: "
                           f"delete it and download it again")


def _decoder_norm_summary(sae: SAE, path: Path) -> dict[str, float]:
    norms = sae.decoder_norms
    summary = {"decoder_norm_min": float(norms.min()), "decoder_norm_max": float(norms.max()),
               "decoder_norm_mean": float(norms.mean())}
    if (norms - 1).abs().max() > DECODER_NORM_TOLERANCE:
        log.warning("%s: decoder rows are not unit-norm (min %.4f, max %.4f, mean %.4f); steering uses the "
                    "unit-normalised row and records the raw norm", path, summary["decoder_norm_min"],
                    summary["decoder_norm_max"], summary["decoder_norm_mean"])
    return summary


# --------------------------------------------------------------------------- SAELens interop


def load_saelens(release: str, sae_id: str, device: str = "cpu") -> SAE:
    """Load an SAE through SAELens (optional, not a dependency) and convert it to our classes.

    Supported SAELens architectures: 'jumprelu', 'standard' (ReLU, threshold 0) and 'topk'. A
    ``b_dec`` subtracted before encoding (``apply_b_dec_to_input``) is folded into ``b_enc``
    (``(x - b_dec) @ W + b = x @ W + (b - b_dec @ W)``); input normalisations other than 'none' are
    refused (load those SAEs with ``load_sae``, which reads the release's own preprocessing).
    """
    try:
        from sae_lens import SAE as SAELensSAE
    except ImportError as exc:
        raise SAEError("load_saelens needs SAELens, which pva-sae does not install: `pip install sae-lens`, "
                       "or use load_sae(release, layer) which reads the same files directly") from exc
    loaded = SAELensSAE.from_pretrained(release, sae_id, device=device)
    sae_lens_sae = loaded[0] if isinstance(loaded, tuple) else loaded  # older SAELens returned (sae, cfg, sparsity)
    return convert_saelens(sae_lens_sae, meta={"release": release, "sae_id": sae_id, "source": "sae_lens"}).to(device)


def convert_saelens(sae_lens_sae, meta: dict[str, Any] | None = None) -> SAE:
    """Our JumpReLUSAE / TopKSAE with the weights of an SAELens SAE object."""
    cfg = sae_lens_sae.cfg
    arch = getattr(cfg, "architecture", "standard")
    arch = arch() if callable(arch) else arch
    norm = getattr(cfg, "normalize_activations", "none") or "none"
    if norm != "none":
        raise SAEError(f"SAELens SAE uses normalize_activations={norm!r}, which is applied at run time and not "
                       f"stored in the weights; load it with pva_sae.sae.registry.load_sae instead")
    W_enc, b_enc = as_float32(sae_lens_sae.W_enc), as_float32(sae_lens_sae.b_enc)
    W_dec, b_dec = as_float32(sae_lens_sae.W_dec), as_float32(sae_lens_sae.b_dec)
    if getattr(cfg, "apply_b_dec_to_input", False):
        b_enc = b_enc - b_dec @ W_enc
    meta = {**(meta or {}), "arch": str(arch), "d_model": int(W_enc.shape[0]), "d_sae": int(W_enc.shape[1])}
    if arch == "jumprelu":
        return JumpReLUSAE(W_enc, W_dec, b_enc, b_dec, as_float32(sae_lens_sae.threshold), meta=meta)
    if arch == "standard":
        return JumpReLUSAE(W_enc, W_dec, b_enc, b_dec, torch.zeros(W_enc.shape[1]), meta=meta)
    if arch == "topk":
        kwargs = getattr(cfg, "activation_fn_kwargs", None) or {}
        k = getattr(cfg, "k", None) or kwargs.get("k")
        if k is None:
            raise SAEError("SAELens TopK SAE without k in its config; cannot convert it")
        return TopKSAE(W_enc, W_dec, b_enc, b_dec, k=int(k), meta={**meta, "k": int(k)})
    raise SAEError(f"SAELens architecture {arch!r} is not supported (supported: jumprelu, standard, topk)")
