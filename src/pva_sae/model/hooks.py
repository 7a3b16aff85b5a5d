"""Reading and writing the residual stream of a decoder-only transformer: the one module that
touches model internals.

Site convention (used everywhere in pva-sae):

- ``'resid_post'`` at layer ``L`` = the OUTPUT of decoder layer ``L`` (Hugging Face
  ``model.model.layers[L]``) = ``hidden_states[L + 1]`` of ``output_hidden_states=True`` (index 0 is
  the embeddings) = TransformerLens ``blocks.L.hook_resid_post`` = the site GemmaScope's ``layer_L``
  SAEs were trained on. This is the default.
- ``'resid_pre'`` at layer ``L`` = the INPUT of decoder layer ``L`` = ``hidden_states[L]``. Paired
  with the SAE ``layer_L`` it reproduces an earlier published pipeline, which read the input of block
  ``L`` but applied the SAE trained on its output (an off-by-one); use it only to reproduce that.

Why hooks rather than ``output_hidden_states``: transformers replaces the LAST entry of
``hidden_states`` with the output of the final norm (``last_hidden_state``), so
``hidden_states[n_layers]`` is not the residual of the last layer; and it keeps every layer of every
position, where we need a few positions of a few layers.

transformers 5.x decoder layers may return a plain tensor or a tuple ``(hidden, ...)``; taking
``output[0]`` of a tensor silently selects batch row 0. :func:`residual_of` and
:func:`replace_residual` handle both and keep the structure.

Hook order: PyTorch runs a module's hooks in registration order, and each hook sees the value left
by the previous one. So a :class:`CaptureHook` entered INSIDE a :class:`SteeringHook` on the same
layer and site records the steered residual; one entered before it records the unsteered one.
transformers registers its own ``output_hidden_states`` recording hooks lazily, the first time
hidden states are requested; whether those see steering depends on that order too, so read steered
residuals through a :class:`CaptureHook`.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pva_sae.config import SITES

STEER_POSITIONS = ("all", "prompt", "generated")

# Where causal LMs keep their decoder layers, tried in order (attribute paths from the loaded model).
LAYER_PATHS = (
    "model.layers",                 # Gemma, Llama, Mistral, Qwen ... ForCausalLM
    "layers",                       # their base models (Gemma2Model, LlamaModel ...)
    "model.language_model.layers",  # multimodal wrappers (Gemma-3, Llava ...)
    "language_model.layers",
    "transformer.h",                # GPT-2, GPT-J, Bloom ...
    "h",
    "gpt_neox.layers",              # Pythia / GPT-NeoX
    "model.decoder.layers",         # OPT
)


def check_site(site: str) -> str:
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}: use one of {SITES} ('resid_post' = output of decoder layer L, "
                         f"the GemmaScope layer_L site)")
    return site


def decoder_layers(model: Any) -> "torch.nn.ModuleList":
    """The model's list of decoder layers (``model.model.layers`` for Gemma/Llama/Mistral/Qwen-like models).

    Raises a ``ValueError`` listing every attribute path tried, so a new architecture is one line in
    :data:`LAYER_PATHS` away.
    """

    for path in LAYER_PATHS:
        obj = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
            return obj
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}: tried "
                     f"{', '.join(LAYER_PATHS)}; add the attribute path to pva_sae.hooks.LAYER_PATHS")


def check_layers(model: Any, layers: Sequence[int] | int) -> list[int]:
    """Validate layer indices against the model (0..n_layers-1, no duplicates); returns them as a list.

    Negative indices are refused: a layer number is also an SAE's name, and ``-1`` would silently mean
    a different layer on a different model.
    """
    n = len(decoder_layers(model))
    layers = [layers] if isinstance(layers, int) else list(layers)
    if not layers:
        raise ValueError("no layers requested: pass at least one layer index")
    if not all(hasattr(layer, "__index__") and not isinstance(layer, bool) for layer in layers):
        raise TypeError(f"layer indices must be integers, got {layers!r}")
    layers = [operator.index(layer) for layer in layers]  # numpy / torch integers -> int
    bad = [layer for layer in layers if not 0 <= layer < n]
    if bad:
        raise IndexError(f"layer(s) {bad} out of range: {type(model).__name__} has {n} decoder layers, "
                         f"indices 0..{n - 1}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"duplicate layers in {layers}: list each layer once")
    return layers


# --------------------------------------------------------------------------- tensor or tuple

def residual_of(output: Any) -> "torch.Tensor":
    """The hidden states (batch, seq, d_model) in a decoder layer's output: the tensor itself or item 0 of a tuple."""

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"unexpected decoder-layer output {type(output).__name__}: expected a tensor or a tuple "
                    f"whose first item is the hidden-states tensor")


def replace_residual(output: Any, new: "torch.Tensor") -> Any:
    """``output`` with its hidden states replaced by ``new``, in the same structure (tensor, tuple or list)."""
    residual_of(output)  # validates the structure
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    return new


def _input_residual(args: tuple, kwargs: dict) -> "torch.Tensor":
    """A decoder layer's input hidden states: first positional argument, else the ``hidden_states`` keyword."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not _is_tensor(hidden):
        raise TypeError(f"cannot find the decoder layer's input hidden states: expected a tensor as the first "
                        f"positional argument or the 'hidden_states' keyword, got {type(hidden).__name__}")
    return hidden


def _replace_input_residual(args: tuple, kwargs: dict, new: "torch.Tensor") -> tuple[tuple, dict]:
    if args:
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


def _is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


# --------------------------------------------------------------------------- hook plumbing

class _LayerHooks:
    """Registers one hook per layer at a site and removes them all on exit, also after an error.

    Subclasses implement ``_on_residual(layer, hidden, is_input) -> new hidden or None``.
    """

    def __init__(self, model: Any, layers: Sequence[int] | int, site: str):
        self.model = model
        self.site = check_site(site)
        self.layers = check_layers(model, layers)
        self.calls: dict[int, int] = {layer: 0 for layer in self.layers}  # hook invocations per layer
        self._handles: list[Any] = []

    def __enter__(self):
        if self._handles:
            raise RuntimeError(f"this {type(self).__name__} is already active; create a new one to nest hooks")
        modules = decoder_layers(self.model)
        try:
            for layer in self.layers:
                self._handles.append(self._register(modules[layer], layer))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this object registered (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def _register(self, module: Any, layer: int) -> Any:
        if self.site == "resid_post":
            def post_hook(mod, args, output):
                new = self._on_residual(layer, residual_of(output))
                return None if new is None else replace_residual(output, new)

            return module.register_forward_hook(post_hook)

        def pre_hook(mod, args, kwargs):
            new = self._on_residual(layer, _input_residual(args, kwargs))
            return None if new is None else _replace_input_residual(args, kwargs, new)

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def _on_residual(self, layer: int, hidden: "torch.Tensor") -> "torch.Tensor | None":
        raise NotImplementedError


class StopForward(Exception):
    """Raised by a :class:`CaptureHook` with ``stop=True`` once its last layer is recorded.

    The layers after it, the final norm and the unembedding (a (batch, seq, vocab) matrix: 256k
    columns for Gemma) are then skipped. Catch it around the forward call.
    """


class CaptureHook(_LayerHooks):
    """Record the residual stream at some positions of some layers, for every forward call.

    ``records[layer]`` holds one float32 tensor per forward call, on ``device`` (CPU by default):
    shape (batch, d_model) for an int position (default -1, the last position, which is the last
    prompt token because prompts are LEFT padded), (batch, len(positions), d_model) for a sequence of
    positions, (batch, seq, d_model) for ``positions=None``. ``calls[layer]`` counts hook invocations,
    so a test can prove each hook fired exactly once per forward pass (:func:`assert_fired_once`).

    ``stop=True`` raises :class:`StopForward` right after the highest requested layer is recorded
    (hooks registered after this one on that layer then do not run): for capture-only passes.

    Usage::

        with CaptureHook(model, [3, 7]) as cap:
            model(**batch, use_cache=False)
        cap.records[3][-1]  # (batch, d_model)
    """

    def __init__(self, model: Any, layers: Sequence[int] | int, site: str = "resid_post",
                 positions: int | Sequence[int] | None = -1, device: Any = "cpu", stop: bool = False):
        super().__init__(model, layers, site)
        if positions is not None and not isinstance(positions, int):
            positions = list(positions)
            if not positions or not all(isinstance(p, int) for p in positions):
                raise ValueError(f"positions must be an int, a non-empty sequence of ints or None, got {positions!r}")
        self.positions = positions
        self.device = device
        self.stop = stop
        self.records: dict[int, list["torch.Tensor"]] = {layer: [] for layer in self.layers}

    def _on_residual(self, layer: int, hidden: "torch.Tensor") -> None:
        self.calls[layer] += 1
        picked = hidden if self.positions is None else hidden[:, self.positions]  # (batch, [n_pos,] d_model)
        self.records[layer].append(picked.detach().to(device=self.device, dtype=torch.float32, copy=True))
        if self.stop and layer == max(self.layers):
            raise StopForward(layer)
        return None

    def take(self) -> dict[int, list["torch.Tensor"]]:
        """Return the records so far and start afresh (call counts are kept)."""
        records, self.records = self.records, {layer: [] for layer in self.layers}
        return records


class SteeringHook(_LayerHooks):
    """Add ``alpha * direction`` to the residual stream at one layer and site.

    ``positions``:
    - ``'all'``: every position of every forward call;
    - ``'prompt'``: calls whose sequence length is > 1 (the prefill of ``generate``; any plain forward);
    - ``'generated'``: calls whose sequence length is 1 (the decode steps of ``generate``).
    The prompt/generated split relies on a KV cache (``generate``'s default): without one every step
    re-reads the whole sequence, and 'generated' would never apply.

    ``direction`` (d_model,) is multiplied by ``alpha`` in float32, then cast to the residual's dtype
    and device. ``alpha == 0`` adds nothing at all, so outputs are bit-identical to an unhooked model
    (the noise-floor control of steering studies). ``calls`` counts hook invocations,
    ``applications`` the invocations that changed the residual.
    """

    def __init__(self, model: Any, layer: int, direction: "torch.Tensor", alpha: float,
                 site: str = "resid_post", positions: str = "all"):

        if not isinstance(layer, int):
            raise TypeError(f"SteeringHook steers one layer: pass an int, got {layer!r}")
        super().__init__(model, [layer], site)
        if positions not in STEER_POSITIONS:
            raise ValueError(f"unknown positions {positions!r}: use one of {STEER_POSITIONS}")
        direction = torch.as_tensor(direction)
        if direction.ndim != 1:
            raise ValueError(f"direction must be a vector (d_model,), got shape {tuple(direction.shape)}")
        if not torch.isfinite(direction).all():
            raise ValueError("direction holds NaN or inf values")
        self.layer = layer
        self.direction = direction.detach().float()
        self.alpha = float(alpha)
        self.positions = positions
        self.applications = 0
        self._delta_cache: dict[tuple, "torch.Tensor"] = {}

    def delta(self, dtype: "torch.dtype", device: Any) -> "torch.Tensor":
        """``alpha * direction`` in the residual's dtype and device (d_model,), computed once per dtype/device."""
        key = (dtype, str(device))
        if key not in self._delta_cache:
            self._delta_cache[key] = (self.alpha * self.direction).to(device=device, dtype=dtype)
        return self._delta_cache[key]

    def _applies(self, seq_len: int) -> bool:
        if self.positions == "all":
            return True
        return (seq_len > 1) == (self.positions == "prompt")

    def _on_residual(self, layer: int, hidden: "torch.Tensor") -> "torch.Tensor | None":
        self.calls[layer] += 1
        if hidden.shape[-1] != self.direction.shape[0]:
            raise ValueError(f"direction has {self.direction.shape[0]} dimensions but layer {layer}'s residual has "
                             f"{hidden.shape[-1]}: use a direction of this model's d_model (wrong SAE or model?)")
        if self.alpha == 0.0 or not self._applies(hidden.shape[1]):
            return None
        self.applications += 1
        return hidden + self.delta(hidden.dtype, hidden.device)  # (batch, seq, d_model); out of place


@dataclass(frozen=True)
class ResidualWriters:
    """Where one architecture's decoder layer reads and writes the residual (attribute paths in the layer)."""

    attn_out: str            # linear layer whose output (through attn_norm, if any) is added to the residual
    mlp_out: str
    attn_norm: str | None    # RMSNorm between attn_out and the addition (Gemma-2), None when there is none
    mlp_norm: str | None
    gain_offset: float       # that RMSNorm's gain is gain_offset + weight (Gemma: 1 + w)
    mlp_input: str           # the module whose input is the residual between the attention and MLP branches


WRITERS = {  # config.model_type -> ResidualWriters
    # Gemma-2's post_attention_layernorm normalises the attention OUTPUT; its MLP branch reads pre_feedforward_layernorm
    "gemma2": ResidualWriters("self_attn.o_proj", "mlp.down_proj", "post_attention_layernorm",
                              "post_feedforward_layernorm", 1.0, "pre_feedforward_layernorm"),
    "llama": ResidualWriters("self_attn.o_proj", "mlp.down_proj", None, None, 0.0, "post_attention_layernorm"),
    "mistral": ResidualWriters("self_attn.o_proj", "mlp.down_proj", None, None, 0.0, "post_attention_layernorm"),
    "qwen2": ResidualWriters("self_attn.o_proj", "mlp.down_proj", None, None, 0.0, "post_attention_layernorm"),
}
ABLATION_MODES = ("residual", "writes")


def residual_writers(model: Any) -> ResidualWriters:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in WRITERS:
        raise ValueError(f"the residual writers of {sorted(WRITERS)} are known, not of {model_type!r}: add an entry "
                         f"to pva_sae.model.hooks.WRITERS")
    return WRITERS[model_type]


def submodule(module: Any, path: str) -> Any:
    for name in path.split("."):
        module = getattr(module, name)
    return module


def unit_vector(direction: Any) -> "torch.Tensor":
    """(d_model,) float32 of unit norm; ValueError for a zero or non-finite vector."""
    d = torch.as_tensor(direction).detach().float().flatten()
    if not torch.isfinite(d).all() or d.norm() == 0:
        raise ValueError("the ablated direction must be a finite non-zero vector (d_model,)")
    return d / d.norm()


def write_directions(model: Any, direction: Any) -> list[tuple["torch.Tensor", "torch.Tensor"]]:
    """Per layer, the unit vectors (attention, MLP) that must be projected out of the branch outputs BEFORE
    their post-norm so that the normed output has no component along ``direction``.

    RMSNorm(x) = g * x / rms(x) has d . RMSNorm(x) = (g * d) . x / rms(x): zero exactly when x is
    orthogonal to u = g * d. Without a post-norm u = d.
    """
    arch, d = residual_writers(model), unit_vector(direction)
    out = []
    for layer in decoder_layers(model):
        pair = []
        for norm in (arch.attn_norm, arch.mlp_norm):
            if norm is None:
                pair.append(d)
            else:
                gain = arch.gain_offset + submodule(layer, norm).weight.detach().float().cpu()    # (d_model,)
                pair.append(unit_vector(gain * d))
        out.append((pair[0], pair[1]))
    return out


def project_out(hidden: "torch.Tensor", unit: "torch.Tensor") -> "torch.Tensor":
    """``hidden`` (..., d_model) minus its component along the unit vector ``unit``, computed in float32."""
    h = hidden.float()
    u = unit.to(device=hidden.device, dtype=torch.float32)
    return (h - (h @ u).unsqueeze(-1) * u).to(hidden.dtype)            # (..., d_model)


class AblationHook(_LayerHooks):
    """Directional ablation: the residual stream has no component along ``direction`` anywhere.

    Two modes, equal for models whose blocks add their outputs directly (Llama), different for
    Gemma-2, whose branch outputs pass through an RMSNorm before they are added:

    - ``'residual'``: project d out of the residual at the input of layer 0 (the embeddings), at the
      input of every MLP branch (the residual after attention) and at the output of every layer
      (directional ablation as defined on the residual stream);
    - ``'writes'``: project d out of the embeddings and, in every layer, u = g * d out of the attention
      and MLP outputs before their post-norm (:func:`write_directions`). This is what weight
      orthogonalization (:mod:`pva_sae.model.orthogonalize`) does to the weights, so it gives the same
      forward pass. With a post-norm the two modes differ: removing u before the norm changes rms(x),
      which rescales the rest of the normed output, while 'residual' removes d after it.

    Every position of every forward call is ablated. ``calls[layer]`` counts the hooks on the layer's
    output ('residual') or its MLP write ('writes'), so :func:`assert_fired_once` applies; ``input_calls``
    counts the embedding hook.
    """

    def __init__(self, model: Any, direction: Any, mode: str = "residual"):
        if mode not in ABLATION_MODES:
            raise ValueError(f"unknown ablation mode {mode!r}: use one of {ABLATION_MODES}")
        super().__init__(model, list(range(len(decoder_layers(model)))), "resid_post")
        self.mode = mode
        self.arch = residual_writers(model)
        self.unit = unit_vector(direction)
        self.writes = write_directions(model, self.unit) if mode == "writes" else None
        self.input_calls = 0

    def __enter__(self):
        if self._handles:
            raise RuntimeError("this AblationHook is already active; create a new one to nest hooks")
        modules = decoder_layers(self.model)
        try:
            self._handles.append(modules[0].register_forward_pre_hook(self._input_hook, with_kwargs=True))
            for layer in self.layers:
                if self.mode == "residual":
                    self._handles.append(self._register(modules[layer], layer))
                    self._pre(submodule(modules[layer], self.arch.mlp_input), self.unit, None)
                else:
                    u_attn, u_mlp = self.writes[layer]
                    self._write(modules[layer], self.arch.attn_norm, self.arch.attn_out, u_attn, None)
                    self._write(modules[layer], self.arch.mlp_norm, self.arch.mlp_out, u_mlp, layer)
        except BaseException:
            self.remove()
            raise
        return self

    def _input_hook(self, mod, args, kwargs):
        self.input_calls += 1
        return _replace_input_residual(args, kwargs, self._project(_input_residual(args, kwargs), self.unit))

    def _pre(self, module: Any, unit: "torch.Tensor", layer: int | None) -> None:
        def hook(mod, args, kwargs):
            if layer is not None:
                self.calls[layer] += 1
            return _replace_input_residual(args, kwargs, self._project(_input_residual(args, kwargs), unit))

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _write(self, layer_module: Any, norm: str | None, linear: str, unit: "torch.Tensor", layer: int | None) -> None:
        """Project ``unit`` out of the input of the post-norm, or out of the linear's output without one."""
        if norm is not None:
            self._pre(submodule(layer_module, norm), unit, layer)
            return

        def hook(mod, args, output):
            if layer is not None:
                self.calls[layer] += 1
            return self._project(output, unit)

        self._handles.append(submodule(layer_module, linear).register_forward_hook(hook))

    def _project(self, hidden: "torch.Tensor", unit: "torch.Tensor") -> "torch.Tensor":
        if hidden.shape[-1] != unit.shape[0]:
            raise ValueError(f"direction has {unit.shape[0]} dimensions but the residual has {hidden.shape[-1]}")
        return project_out(hidden, unit)

    def _on_residual(self, layer: int, hidden: "torch.Tensor") -> "torch.Tensor":
        self.calls[layer] += 1
        return self._project(hidden, self.unit)


def assert_fired_once(hook: _LayerHooks, n_forward: int) -> None:
    """Raise ``AssertionError`` unless every hooked layer fired exactly once per forward pass (``n_forward`` passes).

    A layer called twice per pass (a wrapper calling it again, a hook registered twice) or never
    (a wrong layer list) silently corrupts captured data; this turns that into an error.
    """
    wrong = {layer: n for layer, n in hook.calls.items() if n != n_forward}
    if wrong:
        raise AssertionError(f"expected each hooked layer to fire {n_forward} time(s) (once per forward pass); "
                             f"got {wrong} (layer: calls)")
