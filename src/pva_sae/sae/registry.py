"""Sparse autoencoders: the release registry, loading (GemmaScope, LlamaScope, SAELens) and encode/decode.

The registry is data (``assets/sae_releases.json``): a release names a hub repository (or a directory
inside the package), the weight-file layout and, for GemmaScope, the canonical average-L0 folder of
every layer. ``load_sae`` resolves a (release, layer) to a file, from a local mirror of the repository
or the Hugging Face hub, and ``load_sae_file`` reads and checks it.

Conventions (shapes are ``(rows, cols)``):

* ``W_enc (d_model, d_sae)``, ``b_enc (d_sae,)``, ``W_dec (d_sae, d_model)``, ``b_dec (d_model,)``.
* JumpReLU (GemmaScope, Rajamanoharan et al. 2024, "Jumping Ahead"; Lieberum et al. 2024, "Gemma
  Scope"): ``pre = x @ W_enc + b_enc``; ``acts = relu(pre) * (pre > threshold)``. GemmaScope does NOT
  subtract ``b_dec`` from the input. Decode: ``acts @ W_dec + b_dec``.
* TopK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): keep the k largest entries of
  ``relu(pre)`` per row, zero the rest.
* Everything is computed in float32: inputs (often bfloat16 residuals) are cast up first, because a
  latent whose pre-activation sits near its threshold flips under bfloat16 rounding.
* A latent "fires" when its activation is > 0.

LlamaScope checkpoints are not stored in this convention; ``load_sae_file`` folds their preprocessing
into the weights so that every loaded SAE takes raw residuals (see ``_llamascope_tensors``).

This module imports torch inside functions and classes only on use: ``import pva_sae`` stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pva_sae.config import Config
from pva_sae.hashing import sha256_file

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent.parent
REGISTRY_FILE = PACKAGE_DIR / "assets" / "sae_releases.json"

GEMMASCOPE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
LLAMASCOPE_KEYS = ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias")
# Optional tensors that OpenMOSS lm-saes checkpoints may carry besides the four Linear weights.
LLAMASCOPE_OPTIONAL = ("log_jumprelu_threshold",)
LLAMASCOPE_NORM_PREFIX = "dataset_average_activation_norm."

# Decoder rows further than this from unit norm are reported with a warning at load time.
DECODER_NORM_TOLERANCE = 0.05
WIDTH = re.compile(r"^(\d+)([km]?)$")


class SAEError(ValueError):
    """An SAE could not be resolved, read or used; the message names the problem and the fix."""


# --------------------------------------------------------------------------- registry


@lru_cache(maxsize=1)
def _registry() -> tuple[dict[str, Any], ...]:
    with open(REGISTRY_FILE, encoding="utf-8") as f:
        return tuple(json.load(f)["releases"])


def list_releases() -> list[dict[str, Any]]:
    """Every registered release as a dict (a copy: mutating it does not change the registry)."""
    return [json.loads(json.dumps(entry)) for entry in _registry()]


def release_entry(release: str) -> dict[str, Any]:
    """The registry entry of ``release``; unknown keys raise an error listing the valid ones."""
    for entry in _registry():
        if entry["key"] == release:
            return entry
    valid = ", ".join(e["key"] for e in _registry())
    raise SAEError(f"unknown SAE release {release!r}; valid releases: {valid} (see `pva-sae saes`)")


def width_to_d_sae(width: str) -> int:
    """'16k' -> 16384, '1m' -> 1048576, '32768' -> 32768 (GemmaScope names widths in powers of two)."""
    match = WIDTH.match(str(width).strip().lower())
    if not match:
        raise SAEError(f"SAE width {width!r} is not of the form '16k', '1m' or a plain number")
    number, unit = int(match.group(1)), match.group(2)
    return number * {"": 1, "k": 1024, "m": 1024 * 1024}[unit]


def _check_layer(entry: dict[str, Any], layer: int) -> None:
    n_layers = entry["n_layers"]
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n_layers:
        raise SAEError(f"layer {layer!r} is out of range for SAE release {entry['key']!r}: "
                       f"it has layers 0..{n_layers - 1}")


def canonical_l0(release: str, layer: int, width: str | None = None) -> int:
    """The canonical average-L0 folder of (release, layer, width); an error says to give ``l0`` when unknown."""
    entry = release_entry(release)
    _check_layer(entry, layer)
    width = width or entry.get("default_width")
    table = entry.get("canonical_l0", {}).get(str(width))
    if table is None or str(layer) not in table:
        known = ", ".join(sorted(entry.get("canonical_l0", {}))) or "none"
        raise SAEError(
            f"release {release!r} has no canonical L0 for layer {layer} at width {width!r} (widths with a "
            f"canonical table: {known}); give the L0 explicitly (analysis.sae_l0 / l0=N, the N of the "
            f"repository folder layer_{layer}/width_{width}/average_l0_N)")
    return int(table[str(layer)])


def resolve_sae(release: str, layer: int, width: str | None = None, l0: int | None = None) -> str:
    """Path of the weight file inside the release's repository (or package directory).

    With ``l0=None`` the canonical L0 of the layer is used; the result always names an
    ``average_l0_N`` folder, never a literal ``canonical/`` folder (some were deleted from the hub).
    """
    entry = release_entry(release)
    _check_layer(entry, layer)
    template = entry["file_template"]
    if "{width}" not in template and width is not None and width != entry.get("default_width"):
        raise SAEError(f"release {release!r} has a single width ({entry.get('default_width')}); "
                       f"got width={width!r}: leave it unset")
    if "{l0}" not in template and l0 is not None:
        raise SAEError(f"release {release!r} has no L0 choice (its file is {template}); leave l0 unset")
    width = width or entry.get("default_width")
    fields: dict[str, Any] = {"layer": layer}
    if "{width}" in template:
        width_to_d_sae(width)  # validates the form
        fields["width"] = width
    if "{l0}" in template:
        if l0 is not None and (not isinstance(l0, int) or isinstance(l0, bool) or l0 <= 0):
            raise SAEError(f"l0 must be a positive integer (the N of average_l0_N), got {l0!r}")
        fields["l0"] = l0 if l0 is not None else canonical_l0(release, layer, width)
    return template.format(**fields)


# --------------------------------------------------------------------------- modules


def _torch():
    return torch


def _make_classes():
    """Build the nn.Module classes on first use, so that importing this module does not import torch."""
    torch = _torch()

    class SAEBase(torch.nn.Module):
        """Shared parts: weights as float32 buffers, decode, decoder-row geometry, metadata."""

        def __init__(self, W_enc, W_dec, b_enc, b_dec, meta: dict[str, Any] | None = None):
            super().__init__()
            d_model, d_sae = W_enc.shape
            _expect_shape("W_dec", tuple(W_dec.shape), (d_sae, d_model))
            _expect_shape("b_enc", tuple(b_enc.shape), (d_sae,))
            _expect_shape("b_dec", tuple(b_dec.shape), (d_model,))
            self.register_buffer("W_enc", _f32(W_enc))   # (d_model, d_sae)
            self.register_buffer("W_dec", _f32(W_dec))   # (d_sae, d_model)
            self.register_buffer("b_enc", _f32(b_enc))   # (d_sae,)
            self.register_buffer("b_dec", _f32(b_dec))   # (d_model,)
            self.meta: dict[str, Any] = dict(meta or {})

        @property
        def d_model(self) -> int:
            return int(self.W_enc.shape[0])

        @property
        def d_sae(self) -> int:
            return int(self.W_enc.shape[1])

        def extra_repr(self) -> str:
            k = getattr(self, "k", None)
            return f"d_model={self.d_model}, d_sae={self.d_sae}" + (f", k={k}" if k is not None else "")

        def pre_activations(self, x):
            """``x @ W_enc + b_enc`` in float32: (..., d_model) -> (..., d_sae)."""
            if x.shape[-1] != self.d_model:
                raise SAEError(f"input has last dimension {x.shape[-1]} but this SAE expects d_model "
                               f"{self.d_model}: activations from another model or layer site?")
            x = x.to(device=self.W_enc.device, dtype=torch.float32)
            return x @ self.W_enc + self.b_enc

        def decode(self, z):
            """``z @ W_dec + b_dec``: (..., d_sae) -> (..., d_model), float32."""
            return z.to(device=self.W_dec.device, dtype=torch.float32) @ self.W_dec + self.b_dec

        def forward(self, x):
            return self.decode(self.encode(x))

        @property
        def decoder_norms(self):
            """L2 norm of every decoder row: (d_sae,)."""
            return self.W_dec.norm(dim=1)

        def unit_direction(self, idx: int):
            """Decoder row ``idx`` scaled to unit L2 norm: (d_model,). The raw norm is ``decoder_norms[idx]``."""
            if not 0 <= int(idx) < self.d_sae:
                raise SAEError(f"latent index {idx} is out of range: this SAE has {self.d_sae} latents")
            row = self.W_dec[int(idx)]
            norm = row.norm()
            if norm == 0:
                raise SAEError(f"latent {idx} has an all-zero decoder row (a dead latent): it has no direction")
            return row / norm

    class JumpReLUSAE(SAEBase):
        """JumpReLU SAE (GemmaScope): ``acts = relu(pre) * (pre > threshold)``, no ``b_dec`` subtraction.

        Formula: Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with
        JumpReLU Sparse Autoencoders", eq. (3); GemmaScope's params.npz and its model card.
        """

        def __init__(self, W_enc, W_dec, b_enc, b_dec, threshold, meta: dict[str, Any] | None = None):
            super().__init__(W_enc, W_dec, b_enc, b_dec, meta)
            _expect_shape("threshold", tuple(threshold.shape), (self.d_sae,))
            self.register_buffer("threshold", _f32(threshold))  # (d_sae,)

        def encode(self, x):
            """(..., d_model) -> (..., d_sae) float32 activations; the input is cast to float32 first."""
            pre = self.pre_activations(x)
            return torch.relu(pre) * (pre > self.threshold)

    class TopKSAE(SAEBase):
        """TopK SAE: keep the ``k`` largest entries of ``relu(pre)`` per row (Gao et al. 2024, sec. 2.3).

        ``rank_scale`` (d_sae,), when set, ranks latents by ``relu(pre) * rank_scale`` while keeping the
        values of ``relu(pre)``: OpenMOSS lm-saes does this with decoder-row norms when a checkpoint
        says ``sparsity_include_decoder_norm`` (``SparseAutoEncoder.encode``). Exactly ``k`` positions
        are kept per row (fewer are non-zero when fewer than ``k`` pre-activations are positive); ties
        at the k-th value are broken by ``torch.topk``.

        LlamaScope facts (verified in OpenMOSS/Language-Model-SAEs ``src/lm_saes/sae.py`` and SAELens
        ``llama_scope_sae_huggingface_loader``): the checkpoint stores torch Linear weights
        (``encoder.weight (d_sae, d_model)``, ``decoder.weight (d_model, d_sae)``, i.e. transposed);
        with ``norm_activation == 'dataset-wise'`` the input is multiplied by
        ``sqrt(d_model) / dataset_average_activation_norm['in']`` before encoding and the decoder output
        is in units scaled by ``sqrt(d_model) / ...['out']``. ``load_sae_file`` folds both scalings (and
        a pre-encoder ``b_dec`` subtraction, if configured) into ``W_enc``, ``b_enc``, ``W_dec`` and
        ``b_dec``, so ``encode`` takes raw residuals and ``decode`` returns them. SAELens loads the
        published LlamaScope checkpoints as JumpReLU with the scalar ``jump_relu_threshold`` of their
        hyperparams.json (TopK-trained SAEs converted after training); when that file says
        ``act_fn: jumprelu``, ``load_sae_file`` builds a ``JumpReLUSAE`` instead of this class. Unlike
        SAELens, the threshold is then compared with ``pre * decoder_norm`` when the file says
        ``sparsity_include_decoder_norm``, as lm-saes itself does. The released files were not
        inspected (the hub was out of reach): the rules come from the two code bases.
        """

        def __init__(self, W_enc, W_dec, b_enc, b_dec, k: int, rank_scale=None, meta: dict[str, Any] | None = None):
            super().__init__(W_enc, W_dec, b_enc, b_dec, meta)
            if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.d_sae:
                raise SAEError(f"TopK k must be an integer in 1..{self.d_sae}, got {k!r}")
            self.k = k
            if rank_scale is not None:
                _expect_shape("rank_scale", tuple(rank_scale.shape), (self.d_sae,))
                rank_scale = _f32(rank_scale)
            self.register_buffer("rank_scale", rank_scale)  # (d_sae,) or None

        def encode(self, x):
            """(..., d_model) -> (..., d_sae): ``relu(pre)`` at the top-k positions of each row, 0 elsewhere."""
            acts = torch.relu(self.pre_activations(x))                       # (..., d_sae)
            scores = acts if self.rank_scale is None else acts * self.rank_scale
            idx = scores.topk(self.k, dim=-1).indices                         # (..., k)
            return torch.zeros_like(acts).scatter_(-1, idx, acts.gather(-1, idx))

    for cls, name in ((SAEBase, "SAE"), (JumpReLUSAE, "JumpReLUSAE"), (TopKSAE, "TopKSAE")):
        cls.__name__ = cls.__qualname__ = name  # importable as pva_sae.sae.<name>: pickling works
        cls.__module__ = __name__
    return SAEBase, JumpReLUSAE, TopKSAE


def _expect_shape(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if got != want:
        raise SAEError(f"SAE tensor {name} has shape {got}, expected {want}: the file is not a consistent SAE")


def _f32(t):
    torch = _torch()
    return torch.as_tensor(t).detach().to(torch.float32).contiguous()


_CLASSES: tuple | None = None


def __getattr__(name: str):
    """``JumpReLUSAE``, ``TopKSAE`` and ``SAE`` (their base) are built on first access (torch imports then)."""
    global _CLASSES
    if name in ("SAE", "JumpReLUSAE", "TopKSAE"):
        if _CLASSES is None:
            _CLASSES = _make_classes()
        return dict(zip(("SAE", "JumpReLUSAE", "TopKSAE"), _CLASSES))[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _cls(name: str):
    return __getattr__(name)


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
        _expect_shape(key, arrays[key].shape, want)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object keeps numpy from appending '.npz' to other names
        np.savez(f, **arrays)
    return path


def _to_numpy32(value):
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.ascontiguousarray(np.asarray(value, dtype=np.float32))


def _read_npz(path: Path) -> dict[str, Any]:
    """{key: float32 numpy array} from a params.npz; unreadable archives raise SAEError."""
    import zipfile

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


def _llamascope_tensors(state: dict[str, Any], hp: dict[str, Any] | None, k: int | None, path: Path):
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
    Returns (class name, tensors dict, extra kwargs, preprocessing record).
    """
    torch = _torch()
    hp = dict(hp or {})
    enc_w, enc_b = _f32(state["encoder.weight"]), _f32(state["encoder.bias"])   # (d_sae, d_model), (d_sae,)
    dec_w, dec_b = _f32(state["decoder.weight"]), _f32(state["decoder.bias"])   # (d_model, d_sae), (d_model,)
    d_sae, d_model = enc_w.shape
    _expect_shape("encoder.bias", tuple(enc_b.shape), (d_sae,))
    _expect_shape("decoder.weight", tuple(dec_w.shape), (d_model, d_sae))
    _expect_shape("decoder.bias", tuple(dec_b.shape), (d_model,))
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
            theta = _f32(state["log_jumprelu_threshold"]).exp()
        elif "jump_relu_threshold" in hp:
            theta = torch.full((d_sae,), float(hp["jump_relu_threshold"]))
        else:
            raise SAEError(f"{path}: act_fn is 'jumprelu' but neither a log_jumprelu_threshold tensor nor "
                           f"hyperparams jump_relu_threshold is given; supply the release's hyperparams.json")
        if include_dec_norm:
            theta = theta / dec_norms  # pre * n_i > theta  <=>  pre > theta / n_i  (n_i > 0; dead rows -> inf)
        record["threshold_mean"] = float(theta[torch.isfinite(theta)].mean()) if torch.isfinite(theta).any() else None
        return "JumpReLUSAE", {**tensors, "threshold": theta}, {}, record
    if act_fn == "relu":
        return "JumpReLUSAE", {**tensors, "threshold": torch.zeros(d_sae)}, {}, record
    if act_fn == "topk":
        top_k = hp.get("top_k", k)
        if top_k is None:
            raise SAEError(f"{path}: a TopK SAE needs k; pass k=... or supply the release's hyperparams.json")
        record["k"] = int(top_k)
        return "TopKSAE", tensors, {"k": int(top_k), "rank_scale": dec_norms if include_dec_norm else None}, record
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
            return _read_json(candidate)
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise SAEError(f"could not read {path} ({exc}); delete it and download it again") from exc


# --------------------------------------------------------------------------- loading a file


def load_sae_file(path: str | Path, expected_d_model: int | None = None, *, hyperparams: dict[str, Any] | None = None,
                  k: int | None = None):
    """Read and check one SAE file: GemmaScope ``.npz`` or LlamaScope / lm-saes ``.safetensors``.

    ``.safetensors`` files holding GemmaScope's five keys are read like a params.npz. LlamaScope files
    take their activation and scaling from ``hyperparams`` (or a hyperparams.json found beside
    ``checkpoints/``); without one a TopK SAE with ``k`` and no scaling is built, with a warning.

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
        cls_name, tensors, kwargs, record = "JumpReLUSAE", {k_: _f32(v) for k_, v in arrays.items()}, {}, {
            "format": "gemmascope"}
    elif suffix == ".safetensors":
        state = _read_safetensors(path)
        if set(GEMMASCOPE_KEYS) <= set(state):
            _check_keys(path, set(state), GEMMASCOPE_KEYS)
            cls_name, tensors, kwargs, record = "JumpReLUSAE", state, {}, {"format": "gemmascope"}
        else:
            _check_keys(path, set(state), LLAMASCOPE_KEYS, LLAMASCOPE_OPTIONAL, LLAMASCOPE_NORM_PREFIX)
            hp = hyperparams if hyperparams is not None else _find_hyperparams(path)
            if hp is None:
                log.warning("%s: no hyperparams.json found beside checkpoints/; assuming a TopK SAE (k=%s) on raw "
                            "inputs, without the dataset-wise input scaling LlamaScope uses", path, k)
            cls_name, tensors, kwargs, record = _llamascope_tensors(state, hp, k, path)
    else:
        raise SAEError(f"{path}: unsupported SAE file type {suffix!r}; expected a GemmaScope params.npz "
                       f"or a LlamaScope .safetensors checkpoint")
    _check_gemmascope_shapes(path, tensors)
    _check_finite(path, tensors)
    sae = _cls(cls_name)(**tensors, **kwargs)
    if expected_d_model is not None and sae.d_model != int(expected_d_model):
        raise SAEError(f"SAE expects d_model {sae.d_model} but the model has {expected_d_model}: "
                       f"wrong release for this model? ({path})")
    sae.meta.update({"path": str(path), "sha256": sha256_file(path), "arch": _arch(sae), "d_model": sae.d_model,
                     "d_sae": sae.d_sae, **_decoder_norm_summary(sae, path), "preprocessing": record})
    if getattr(sae, "k", None) is not None:
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
    torch = _torch()
    for key, value in tensors.items():
        if key == "threshold":
            bad = int(torch.isnan(value).sum())  # +inf thresholds mark dead latents (zero decoder rows)
        else:
            bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise SAEError(f"{path}: {key} has {bad} non-finite values (NaN/inf); the file is corrupted: "
                           f"delete it and download it again")


def _decoder_norm_summary(sae, path: Path) -> dict[str, float]:
    norms = sae.decoder_norms
    summary = {"decoder_norm_min": float(norms.min()), "decoder_norm_max": float(norms.max()),
               "decoder_norm_mean": float(norms.mean())}
    if (norms - 1).abs().max() > DECODER_NORM_TOLERANCE:
        log.warning("%s: decoder rows are not unit-norm (min %.4f, max %.4f, mean %.4f); steering uses the "
                    "unit-normalised row and records the raw norm", path, summary["decoder_norm_min"],
                    summary["decoder_norm_max"], summary["decoder_norm_mean"])
    return summary


def _arch(sae) -> str:
    return "topk" if hasattr(sae, "k") else "jumprelu"


# --------------------------------------------------------------------------- loading by release


def load_sae(release: str, layer: int, *, width: str | None = None, l0: int | None = None,
             local_dir: str | Path | None = None, cache_dir: str | Path | None = None,
             local_files_only: bool = False, expected_d_model: int | None = None, device: str = "cpu",
             revision: str | None = None):
    """The SAE of ``release`` at ``layer``, from ``local_dir`` (a directory mirroring the repository
    layout), the package (embedded releases) or the Hugging Face hub (``hf_hub_download``).

    ``width`` defaults to the release's default width, ``l0`` to the layer's canonical L0.
    ``meta`` records release, layer, width, l0, whether it is canonical, the file and its sha256.
    """
    entry = release_entry(release)
    repo_path = resolve_sae(release, layer, width, l0)
    width = width or entry.get("default_width")
    file = _locate(entry, repo_path, local_dir, cache_dir, local_files_only, revision)
    hyperparams = None
    if entry.get("hyperparams_template"):
        hp_path = entry["hyperparams_template"].format(layer=layer)
        hyperparams = _read_json(_locate(entry, hp_path, local_dir, cache_dir, local_files_only, revision))
    sae = load_sae_file(file, expected_d_model, hyperparams=hyperparams, k=entry.get("k"))
    _check_against_entry(entry, sae, width, file)
    used_l0 = int(re.search(r"average_l0_(\d+)", repo_path).group(1)) if "{l0}" in entry["file_template"] else None
    sae.meta.update({"release": release, "layer": layer, "width": width, "l0": used_l0,
                     "canonical": _is_canonical(release, layer, width, used_l0), "repo": entry.get("repo"),
                     "repo_path": repo_path,
                     "revision": revision or entry.get("revision"), "site": entry.get("site")})
    return sae.to(device)


def _is_canonical(release: str, layer: int, width: str | None, l0: int | None) -> bool | None:
    """Whether (layer, width, l0) is the canonical SAE (None when the release has no L0 choice)."""
    if l0 is None:
        return None
    try:
        return canonical_l0(release, layer, width) == l0
    except SAEError:
        return False


def _locate(entry: dict[str, Any], repo_path: str, local_dir, cache_dir, local_files_only: bool,
            revision: str | None) -> Path:
    """Local path of ``repo_path`` of the release: under local_dir, in the package, or downloaded."""
    if local_dir is not None:
        file = Path(local_dir).expanduser() / repo_path
        if not file.is_file():
            source = entry.get("repo") or entry.get("path")
            raise SAEError(f"{file} does not exist: local_dir must mirror the layout of {source} "
                           f"(<local_dir>/{repo_path}); download that file into it or fix local_dir")
        return file
    if entry.get("path"):
        file = PACKAGE_DIR / entry["path"] / repo_path
        if not file.is_file():
            raise SAEError(f"the embedded SAEs of {entry['key']!r} are not built ({file} is missing); build them "
                           f"with `{entry.get('build', 'python scripts/train_default.py')}`")
        return file
    return Path(_hub_download(entry["repo"], repo_path, revision or entry.get("revision"), cache_dir,
                              local_files_only))


def _hub_download(repo: str, filename: str, revision: str | None, cache_dir, local_files_only: bool) -> str:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise SAEError(f"downloading {repo}/{filename} needs huggingface_hub: `pip install 'pva-sae[hub]'` "
                       f"(or huggingface_hub), or pass local_dir= a directory mirroring {repo}") from exc
    try:
        return hf_hub_download(repo_id=repo, filename=filename, revision=revision,
                               cache_dir=str(Path(cache_dir).expanduser()) if cache_dir else None,
                               local_files_only=local_files_only)
    except Exception as exc:  # the hub raises many types (offline, gated, missing file, HTTP)
        hint = ("it is not in the local cache (local_files_only / HF_HUB_OFFLINE is set)" if local_files_only
                else "check the network, the revision and, for gated repositories, `huggingface-cli login`")
        raise SAEError(f"could not fetch {repo}/{filename} from the Hugging Face hub ({type(exc).__name__}: "
                       f"{exc}); {hint}, or pass local_dir= a directory mirroring {repo}") from exc


def _check_against_entry(entry: dict[str, Any], sae, width: str | None, file: Path) -> None:
    if sae.d_model != entry["d_model"]:
        raise SAEError(f"{file} has d_model {sae.d_model} but release {entry['key']!r} is for d_model "
                       f"{entry['d_model']}: the file belongs to another release")
    want = entry.get("d_sae") or (width_to_d_sae(width) if width else None)
    if want is not None and sae.d_sae != want:
        log.warning("%s has %d latents, not the %d of width %s", file, sae.d_sae, want, width)


# --------------------------------------------------------------------------- SAELens interop


def load_saelens(release: str, sae_id: str, device: str = "cpu"):
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


def convert_saelens(sae_lens_sae, meta: dict[str, Any] | None = None):
    """Our JumpReLUSAE / TopKSAE with the weights of an SAELens SAE object."""
    torch = _torch()
    cfg = sae_lens_sae.cfg
    arch = getattr(cfg, "architecture", "standard")
    arch = arch() if callable(arch) else arch
    norm = getattr(cfg, "normalize_activations", "none") or "none"
    if norm != "none":
        raise SAEError(f"SAELens SAE uses normalize_activations={norm!r}, which is applied at run time and not "
                       f"stored in the weights; load it with pva_sae.sae.load_sae instead")
    W_enc, b_enc = _f32(sae_lens_sae.W_enc), _f32(sae_lens_sae.b_enc)
    W_dec, b_dec = _f32(sae_lens_sae.W_dec), _f32(sae_lens_sae.b_dec)
    if getattr(cfg, "apply_b_dec_to_input", False):
        b_enc = b_enc - b_dec @ W_enc
    meta = {**(meta or {}), "arch": str(arch), "d_model": int(W_enc.shape[0]), "d_sae": int(W_enc.shape[1])}
    if arch == "jumprelu":
        return _cls("JumpReLUSAE")(W_enc, W_dec, b_enc, b_dec, _f32(sae_lens_sae.threshold), meta=meta)
    if arch == "standard":
        return _cls("JumpReLUSAE")(W_enc, W_dec, b_enc, b_dec, torch.zeros(W_enc.shape[1]), meta=meta)
    if arch == "topk":
        kwargs = getattr(cfg, "activation_fn_kwargs", None) or {}
        k = getattr(cfg, "k", None) or kwargs.get("k")
        if k is None:
            raise SAEError("SAELens TopK SAE without k in its config; cannot convert it")
        return _cls("TopKSAE")(W_enc, W_dec, b_enc, b_dec, k=int(k), meta={**meta, "k": int(k)})
    raise SAEError(f"SAELens architecture {arch!r} is not supported (supported: jumprelu, standard, topk)")


def resolve_release(cfg: Config, model_key: str) -> str:
    if cfg.analysis.sae_release != "auto":
        return cfg.analysis.sae_release
    matches = [r["key"] for r in list_releases() if model_key in r.get("models", [r.get("model")])]
    if not matches:
        raise ValueError(f"no SAE release is registered for model {model_key!r}; pass --set analysis.sae_release=... "
                         f"(one of: {', '.join(r['key'] for r in list_releases())})")
    return matches[0]


LOCAL_RELEASE = "local"


LOCAL_TEMPLATE = "layer_{layer}/params.npz"


def load_layer_sae(cfg: Config, release: str, layer: int, d_model: int):
    """A registered release, or 'local': GemmaScope-format files at <sae_local_dir>/layer_{L}/params.npz."""

    if release == LOCAL_RELEASE:
        if not cfg.analysis.sae_local_dir:
            raise ValueError("analysis.sae_release='local' needs analysis.sae_local_dir (a directory holding "
                             f"{LOCAL_TEMPLATE})")
        path = Path(cfg.analysis.sae_local_dir).expanduser() / LOCAL_TEMPLATE.format(layer=layer)
        if not path.is_file():
            raise FileNotFoundError(f"no SAE for layer {layer}: {path} is missing (expected {LOCAL_TEMPLATE} under "
                                    "analysis.sae_local_dir, or restrict analysis.layers)")
        sae = load_sae_file(path, expected_d_model=d_model)
        sae.meta.update({"release": LOCAL_RELEASE, "layer": layer, "canonical": False})
        return sae
    return load_sae(release, layer, width=cfg.analysis.sae_width, l0=cfg.analysis.sae_l0,
                    local_dir=cfg.analysis.sae_local_dir, expected_d_model=d_model,
                    local_files_only=cfg.model.local_files_only)
