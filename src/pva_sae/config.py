"""The one typed configuration of pva-sae.

Every field is declared once, with its documentation beside it (``doc(...)``), so that
``pva-sae config`` and error messages come from the same source. A config is built from
defaults, then a JSON/TOML file, then ``--set section.field=value`` overrides; unknown keys
are rejected with the list of valid ones.

This module imports only the standard library: ``import pva_sae`` stays cheap.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pva_sae.data.prompts import DEFAULT_TEMPLATE, PROMPT_STYLES, PromptError, check_template
from pva_sae.errors import PvaSaeError


class ConfigError(PvaSaeError, ValueError):
    """A configuration problem the user can fix; the message says how."""


def doc(default: Any = dataclasses.MISSING, help: str = "", factory: Any = dataclasses.MISSING):
    """A dataclass field carrying its documentation in ``metadata['help']``."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


# Sections whose values change the records of the build stage (a resume must match them exactly).
BUILD_SECTIONS = ("model", "data", "prompt", "generation", "sandbox")
# Build-section fields that cannot change a record: they never block a resume or mark a run as another run's.
NON_RECORD_FIELDS = ("model.torch_threads", "model.local_files_only", "sandbox.workers", "generation.compile",
                     "generation.batch_size", "generation.max_batch_tokens", "generation.backend", "generation.overlap",
                     "generation.schedule", "sandbox.uid_pool_start", "sandbox.uid_pool_size", "sandbox.start_method",
                     "sandbox.label_cache")
# Residual sites (see pva_sae.model.hooks for what each means) and the two predicted classes.
SITES = ("resid_post", "resid_pre")
# Benchmarks data.dataset selects (loaders in pva_sae.data.benchmarks).
DATASETS = ("mbpp", "humaneval")
DIRECTIONS = ("correct", "incorrect")


DEFAULT_STOP_STRINGS = (
    "\nassert ",
    "\nprint(",
    "\nif __name__",
    "\n```",
    "\n# Test",
    "\n# test",
    "\n# Solution",
    "\nWrite a ",
    "\n\n\n\n",
)


@dataclass
class ModelConfig:
    name: str = doc(
        "pva-tiny",
        "Model to load: a registry key (see `pva-sae models`), a Hugging Face hub id, or a local "
        "directory in Hugging Face format. 'pva-tiny' is the embedded default.",
    )
    revision: str = doc("main", "Hub revision (branch, tag or commit) for hub models; ignored for local paths.")
    device: str = doc("auto", "'auto' (cuda, then mps, then cpu), or an explicit torch device such as 'cuda:1'.")
    dtype: str = doc(
        "auto",
        "'auto' (bfloat16 on CUDA, float16 on MPS, float32 on CPU), or float32 / bfloat16 / float16. "
        "Never float16 for Gemma-2 on CUDA (overflow).",
    )
    attn_implementation: str = doc(
        "auto", "'auto' picks 'eager' for Gemma-2 (SDPA drops attention soft-capping), else the library default."
    )
    local_files_only: bool = doc(False, "Never contact the hub; load only cached or local files.")
    torch_threads: int = doc(
        0, "torch intra-op threads. 0 = automatic: on CPU the cores this process may use (generation and the "
        "sandbox take turns, so both get every core), on GPU torch's default. On a machine shared with other "
        "work set it to 1: torch's threads then oversubscribe the cores (7x slower measured on a loaded 2-core "
        "machine); one thread cost 55% more generation time on an idle one.")


@dataclass
class DataConfig:
    dataset: str = doc(
        "mbpp", "Benchmark: 'mbpp' (974 tasks, Austin et al. 2021) or 'humaneval' (164 tasks, Chen et al. 2021; "
        "labels from its own check function). Both are shipped with pva-sae; every stage works on either.")
    source: str = doc(
        "packaged",
        "'packaged' (the copy of data.dataset shipped with pva-sae), 'hub' (google-research-datasets/mbpp or "
        "openai/openai_humaneval via `datasets`, needs network), or a path to a file in that benchmark's format "
        "(MBPP: .jsonl / .json / .parquet; HumanEval: .jsonl / .jsonl.gz).",
    )
    start_idx: int = doc(0, "First task index (0-based position in the dataset, inclusive).")
    end_idx: int | None = doc(None, "Last task index (inclusive); None means the last task.")
    task_ids: tuple[int, ...] | None = doc(
        None, "Build only these task ids (within the index range; HumanEval/N has id N); None means every task of "
        "the range."
    )
    split_fractions: tuple[float, float, float] = doc(
        (0.5, 0.1, 0.4), "Fractions for the (sae, tuning, validation) splits; must sum to 1."
    )
    split_seed: int = doc(42, "Seed of the stratified split (stratified by cyclomatic complexity).")


@dataclass
class PromptConfig:
    template: str = doc(
        DEFAULT_TEMPLATE,
        "Prompt template; placeholders {text} (problem description), {tests} (the test asserts, "
        "one per line) and {initiator}.",
    )
    initiator: str = doc("# Solution:", "Code initiator placed at the end of the prompt.")
    style: str = doc(
        "tests", "'tests': the template (description, test asserts, initiator; for HumanEval the docstring without "
        "its examples, and up to 3 of them as asserts); 'signature': HumanEval's own prompt (signature and "
        "docstring; the model writes the body; template and initiator unused).")


@dataclass
class GenerationConfig:
    max_new_tokens: int = doc(384, "Hard cap on generated tokens per sample.")
    batch_size: int = doc(
        0, "Most prompts per generation batch; 0 = automatic: on CUDA with the fast backend as many as fit in 80% of "
        "free GPU memory (KV cache and prefill for the longest prompt, at most 1,024), else 16. The size used is saved "
        "with the batch plan; a resumed build keeps it.")
    max_batch_tokens: int = doc(
        0,
        "Cap on rows x (longest prompt + max_new_tokens) per batch, so rare very long prompts get small "
        "batches instead of slowing every row of theirs; 0 = automatic (8192 on CPU, no cap on GPU), -1 = no cap.",
    )
    temperature: float = doc(0.0, "0 means greedy decoding; above 0, seeded multinomial sampling.")
    top_p: float = doc(1.0, "Nucleus sampling mass (only when temperature > 0).")
    n_samples: int = doc(1, "Samples per task (more than 1 only makes sense with temperature > 0).")
    seed: int = doc(42, "Seed for sampling; each batch derives its own generator from it.")
    stop_strings: tuple[str, ...] = doc(
        DEFAULT_STOP_STRINGS,
        "Generation stops for a sample once its new text contains one of these (the stop string and "
        "what follows are dropped). They mark the start of top-level test code or a new problem.",
    )
    sort_by_length: bool = doc(True, "Sort prompts by token length before batching (less padding).")
    backend: str = doc(
        "auto",
        "'hf' (transformers generate), 'fast' (pva-sae's static-cache decoder with CUDA-graph steps, Gemma-2 "
        "only; greedy output equals 'hf'), or 'auto' (fast for Gemma-2 on CUDA, else hf).")
    compile: bool = doc(
        False, "Fast backend on CUDA: torch.compile the decode step's layer math (fused kernels; ~1.3x faster "
        "decoding after a warm-up of about a minute). Worth it for long runs.")
    attention: str = doc(
        "eager", "Fast backend: the attention kernel. 'eager' (matmuls and a float32 softmax, op for op as "
        "transformers' eager attention) or 'flex' (CUDA only: FlexAttention compiled to fused Triton kernels, the "
        "soft-cap and masks inside the kernel, a decode step reading only each row's filled cache blocks; "
        "it keeps the scores in float32, so in bfloat16 near-ties can round differently from 'eager'). 'flex' has "
        "CPU tests of its masks and a GPU test and benchmark (docs/benchmarks.md) but no GPU measurement yet, so "
        "it is not the default.")
    overlap: str = doc(
        "auto", "Label batch k in the sandbox (one background thread for the whole stage) while batch k+1 "
        "generates: 'auto' (on when the model runs on an accelerator; off on CPU, where generation and the sandbox "
        "share the cores and take turns), 'on' or 'off'. The records are the same either way.")
    schedule: str = doc(
        "auto", "How the build (and validation's temperature sub-builds) runs its batch plan: 'batches' (one static "
        "batch at a time; every row of a batch decodes until its last row ends), 'queue' (continuous batching, fast "
        "backend only: a row that ends hands its slot to the next item of the plan) or 'auto' (queue on the fast "
        "backend, else batches). Greedy records are the same either way; when sampling, 'queue' draws each sample "
        "from its (seed, task, sample) key and 'batches' from its batch's seed. The schedule is saved with the "
        "batch plan and a resumed build keeps it.")


@dataclass
class SandboxConfig:
    timeout_s: float = doc(
        10.0, "Wall-clock limit per program; the whole process group is killed after it. In a parallel batch a "
        "program that hits it is run once more, alone, after the batch, before its timeout becomes the label.")
    cpu_time_s: int = doc(10, "CPU-time limit (RLIMIT_CPU) per program.")
    memory_limit_mb: int = doc(1024, "Address-space limit (RLIMIT_AS) per program.")
    file_size_limit_mb: int = doc(16, "Largest file a program may write (RLIMIT_FSIZE).")
    max_open_files: int = doc(64, "Open file descriptors per program (RLIMIT_NOFILE).")
    max_processes: int = doc(
        32, "Processes and threads per program (RLIMIT_NPROC). It counts per uid: per job with the uid pool; "
        "without root it counts all of the caller's processes.")
    output_limit_kb: int = doc(64, "Captured stdout/stderr per program; the rest is discarded.")
    workers: int = doc(0, "Programs run in parallel; 0 means one per CPU core this process may use (its affinity).")
    sandbox_user: str = doc(
        "nobody", "Unprivileged user whose group the programs run with when pva-sae runs as root, and whose uid "
        "they run as when uid_pool_size is 0 (RLIMIT_NPROC does not bind root)."
    )
    uid_pool_start: int = doc(
        61000, "As root, each running program gets its own uid from uid_pool_start .. uid_pool_start + "
        "uid_pool_size - 1 (no passwd entry needed; no user may own one), so that concurrent programs cannot "
        "signal or trace each other or share RLIMIT_NPROC. The default stays below systemd's dynamic users (61184).")
    uid_pool_size: int = doc(
        128, "Uids in the pool; at most this many programs run at once on the machine (across processes). "
        "0 runs every program as sandbox_user, sharing one uid.")
    start_method: str = doc(
        "forkserver", "How each program's process starts: 'forkserver' (forked from a trusted server process "
        "started once per pool, which has loaded the sandbox's child code; fast) or 'spawn' (a new interpreter "
        "per program). Both give every program a fresh process with the same isolation, and the same labels.")
    label_cache: bool = doc(
        True, "Reuse the label of an identical job (same program, setup code, tests, label-affecting sandbox "
        "settings, protections and sandbox code) labelled before in this run directory or its sub-runs "
        "(<run>/cache/labels.sqlite), and run identical jobs of a batch once. Timeouts are never reused.")


@dataclass
class CheckpointConfig:
    every_n_records: int = doc(50, "Write a checkpoint after every this many new records (rounded up to a batch).")
    autosave_interval_s: float = doc(300.0, "Also write an autosave when this many seconds passed since the last one.")
    keep_autosaves: int = doc(3, "How many autosaves to keep.")
    keep_checkpoints: int = doc(5, "How many checkpoints to keep (records live in an append-only journal beside them).")
    resume: str = doc(
        "ask",
        "'ask' (prompt when interactive, resume when not), 'auto' (resume from the latest checkpoint), "
        "'never' (start over; existing checkpoints are kept).",
    )
    resume_from: str | None = doc(None, "Resume from this checkpoint file instead of the latest one.")


@dataclass
class OutputConfig:
    run_dir: str = doc("runs/default", "Run directory; every stage writes under it (layout in pva_sae.rundir).")
    save_format: str = doc("both", "Dataset format: 'json', 'parquet' or 'both'.")


@dataclass
class AnalysisConfig:
    sae_release: str = doc(
        "auto",
        "SAE release (see `pva-sae saes`); 'auto' takes the model's default release from the registry; 'local' "
        "reads GemmaScope-format files <analysis.sae_local_dir>/layer_{L}/params.npz (e.g. written by pva_sae.sae.train.save_sae).",
    )
    sae_width: str | None = doc(None, "SAE width such as '16k'; None takes the release's default.")
    sae_l0: int | None = doc(None, "SAE average L0 folder; None takes the release's canonical L0 for each layer.")
    sae_local_dir: str | None = doc(
        None, "Directory mirroring the SAE repository layout; when set, SAEs load from it instead of the hub."
    )
    layers: tuple[int, ...] | None = doc(None, "Layers to analyse; None means every layer of the model.")
    site: str = doc(
        "resid_post",
        "'resid_post' = output of decoder layer L (where GemmaScope layer_L SAEs were trained); 'resid_pre' = "
        "its input, which reproduces the thesis code's off-by-one.",
    )
    batch_size: int = doc(16, "Prompts per forward pass when capturing activations.")
    general_corpus: str = doc(
        "auto",
        "General-text corpus for the language filter: 'auto' (the model's registered default), 'pile-10k' "
        "(NeelNanda/pile-10k via `datasets`, needs network), 'packaged' (the embedded default's held-out code), "
        "or a local .txt / .jsonl / .parquet file.",
    )
    general_n_docs: int = doc(10000, "Documents of the general corpus to use (fewer if the corpus is smaller).")
    general_seed: int = doc(42, "Seed of the one random word position chosen per general-corpus document.")
    general_max_tokens: int = doc(128, "Longest document prefix fed to the model for the general filter.")
    general_max_frequency: float = doc(
        0.02, "Latents firing on at least this share of general-corpus documents are excluded before ranking."
    )
    top_k: int = doc(20, "Latents kept per direction, per layer and overall, in the ranked table.")
    cache_dir: str = doc("~/.cache/pva-sae", "Cache for general-corpus firing frequencies (keyed by model, SAE, corpus, seed).")
    plots: bool = doc(True, "Write PNG plots (scatter of firing frequencies, activation histograms).")


@dataclass
class ValidationConfig:
    selection_metric: str = doc(
        "t", "How the two predictor latents are chosen on the SAE-analysis split: 't' (Welch t) or 'separation'."
    )
    bootstrap_resamples: int = doc(1000, "Bootstrap resamples for every interval (tasks are resampled, not samples).")
    bootstrap_seed: int = doc(42, "Seed of the bootstrap resamples (and of the random baseline).")
    ci_level: float = doc(0.95, "Confidence level of the bootstrap intervals.")
    probe_folds: int = doc(5, "Cross-validation folds choosing the logistic-regression probe's regularisation.")
    probe_cs: int = doc(10, "Inverse-regularisation strengths tried (log-spaced 1e-4..1e4) for the probe.")
    temperatures: tuple[float, ...] = doc(
        (0.0, 0.5, 1.0, 1.5, 2.0), "Temperatures at which the validation split is regenerated and relabelled."
    )
    samples_per_temperature: int = doc(3, "Samples per task at every temperature above 0 (greedy needs one).")
    robustness_max_tasks: int = doc(
        0, "Regenerate at most this many validation tasks per temperature (seeded subset); 0 = all of them."
    )
    robustness_seed: int = doc(42, "Seed of the robustness task subset; sampling uses generation.seed.")
    plots: bool = doc(True, "Write PNG plots (ROC/PR with bands, histograms, metrics vs temperature/difficulty).")
    transfer_from: str | None = doc(
        None, "Run directory of a finished run (through the steering stage) to transfer from, e.g. the base model's run "
        "when this one uses its instruction-tuned variant: the validation stage evaluates that run's frozen choices "
        "(latents, thresholds, probe and baseline weights) instead of selecting on this run, and the steering stage "
        "steers its latents with its chosen alphas instead of tuning. Needs the same SAE release, width, L0 and site, "
        "and this run's analysis must cover the chosen layers.")


@dataclass
class SteeringConfig:
    selection_metric: str = doc(
        "separation", "How the steered latents are chosen on the SAE-analysis split: 'separation' (as the original "
        "study) or 't'.")
    normalize: str = doc(
        "unit", "'unit': steer along the unit-normalised decoder row; 'raw': the raw row (reproduces coefficients of "
        "studies that used raw rows).")
    alpha_units: str = doc(
        "residual_norm", "'residual_norm': alphas are multiples of the mean residual norm at the layer (last prompt "
        "token, SAE-analysis split), comparable across models; 'absolute': plain coefficients.")
    alpha_grid: tuple[float, ...] = doc(
        (0.05, 0.1, 0.2, 0.5, 1.0, 2.0), "Coefficients tried on the tuning split (see alpha_units), then refined.")
    refine_steps: int = doc(1, "Refinement rounds: geometric midpoints between the best alpha and its neighbours.")
    speculate: str = doc(
        "auto", "Generate the first refinement round's candidates (the midpoint of every pair of neighbouring grid "
        "alphas) with the grid, so the stage waits for its labels one time fewer; the midpoints the refinement does "
        "not ask for are generated but never enter the choice (listed in the tuning results as 'speculative'). "
        "'auto': when labelling runs beside generation (generation.overlap resolved on: on an accelerator), where "
        "the wait costs more than the extra generations; 'on' or 'off'.")
    max_corruption: float = doc(
        0.1, "Objective for the correct direction: maximise correction subject to corruption of initially correct "
        "tuning tasks <= this. The incorrect direction maximises corruption.")
    alphas: tuple[float, float] | None = doc(
        None, "Fixed (correct, incorrect) coefficients in alpha_units; skips the tuning grid.")
    positions: str = doc("all", "Where to add the vector: 'all' (prompt and generated tokens), 'prompt' or 'generated'.")
    site: str | None = doc(None, "Residual site; None = analysis.site (the SAE's site).")
    target: str = doc(
        "latent", "What is steered as the target: 'latent' (the chosen latent's decoder direction), 'random' (a seeded "
        "random direction of the same norm: an exact null against the random controls, for checking calibration "
        "end to end) or 'unembed:<token>' (the token's unembedding row at the same norm: a positive control, e.g. "
        "unembed:<eos>).")
    n_controls: int = doc(
        60, "Control directions per steering direction: half SAE latents of the same layer (near-zero separation, "
        "matched firing rate, passing the general-text filter), half random directions with the target's norm. The "
        "target's rank among K controls cannot go below 1/(K+1).")
    tuning_controls: int = doc(4, "Controls (kinds in turn) run at every alpha of the tuning grid, for the "
                                  "specificity objective.")
    n_permutations: int = doc(10000, "Permutations of the per-task permutation test.")
    bootstrap_resamples: int = doc(2000, "Task-bootstrap resamples of paired differences and net effects.")
    control_max_separation: float = doc(0.02, "Largest |f_correct - f_incorrect| of a control latent.")
    max_tasks: int = doc(0, "Validation tasks used (seeded subset); 0 = all.")
    tuning_max_tasks: int = doc(0, "Tuning tasks used for the alpha grid (seeded subset); 0 = all.")
    seed: int = doc(42, "Seed of task subsets and control choice.")
    ci_level: float = doc(0.95, "Level of every steering interval (Clopper-Pearson rates, bootstrap differences).")
    plots: bool = doc(True, "Write PNG plots (rates vs alpha, target vs controls, net effects, selective vs constant).")


@dataclass
class AblationConfig:
    method: str = doc(
        "weights", "How the direction is removed for every arm: 'weights' (embedding rows, attention output and MLP "
        "down projections orthogonalized; for Gemma-2 against (1 + w) * d of the post-norm that follows), "
        "'write_hooks' (the same edit done by hooks on each write: equal forward pass) or 'residual_hooks' (d "
        "projected out of the residual at every layer; a different intervention when post-norms follow the writes).")
    compare_max_tasks: int = doc(
        8, "Validation tasks (seeded subset) on which each target direction is also removed by the two other methods, "
        "reporting how often outcomes and programs agree; 0 = no comparison.")
    n_random_controls: int = doc(
        -1, "Random control directions per target (seeded, uniform on the sphere; ablation depends on the direction "
        "only); -1 = as many as the steering stage's random controls. The latent controls are the steering stage's.")
    residual_check_tasks: int = doc(
        4, "Prompts on which the residual's component along each target direction is measured at every layer with "
        "the weights orthogonalized (|<r, d>| / |r|, reported as the largest value); 0 = no check.")
    seed: int = doc(42, "Seed of the random control directions and the comparison subset.")
    plots: bool = doc(True, "Write a PNG plot (target vs control flip rates per experiment).")


@dataclass
class AttentionConfig:
    max_tasks: int = doc(0, "Validation tasks whose prompts are read (seeded subset); 0 = all.")
    seed: int = doc(42, "Seed of the task subset and of the task bootstrap.")
    batch_size: int = doc(8, "Prompts per forward pass (eager attention keeps a (batch, heads, seq, seq) matrix per "
                             "layer).")
    bootstrap_resamples: int = doc(2000, "Task-bootstrap resamples of every steered-minus-baseline difference.")
    ci_level: float = doc(0.95, "Level of the bootstrap intervals.")
    plots: bool = doc(True, "Write PNG plots (section masses per condition; tests-section difference per layer and "
                            "head).")


@dataclass
class DistributedConfig:
    # Not a build section (see BUILD_SECTIONS), so no field here is a record field: every shard of a run
    # shares its run directory, resumes there and merges into it (pva_sae.execution.distributed).
    shard: str = doc("", "This process's shard 'I/N' (0 <= I < N) of every generating stage (`--shard I/N`, e.g. one "
                         "Slurm array task each); '' = torchrun's RANK/WORLD_SIZE when set, else one process.")
    timeout_s: float = doc(21600.0, "How long a torchrun rank waits for the others at a barrier (the process group's "
                                    "timeout): the slowest shard's generation must fit in it.")


@dataclass
class Config:
    model: ModelConfig = doc(factory=ModelConfig, help="Which model and how to load it.")
    data: DataConfig = doc(factory=DataConfig, help="Dataset source, task range and splits.")
    prompt: PromptConfig = doc(factory=PromptConfig, help="Prompt format.")
    generation: GenerationConfig = doc(factory=GenerationConfig, help="Decoding.")
    sandbox: SandboxConfig = doc(factory=SandboxConfig, help="Limits for running generated code.")
    checkpoint: CheckpointConfig = doc(factory=CheckpointConfig, help="Checkpoints, autosaves and resume.")
    output: OutputConfig = doc(factory=OutputConfig, help="Where and how results are written.")
    analysis: AnalysisConfig = doc(factory=AnalysisConfig, help="SAE analysis: SAEs, site, general filter, ranking.")
    validation: ValidationConfig = doc(factory=ValidationConfig,
                                       help="Statistical validation: metrics, baselines, robustness.")
    steering: SteeringConfig = doc(factory=SteeringConfig, help="Causal validation by steering with SAE directions.")
    ablation: AblationConfig = doc(factory=AblationConfig,
                                   help="Directional ablation and weight orthogonalization of the steering directions.")
    attention: AttentionConfig = doc(factory=AttentionConfig,
                                     help="Attention from the last prompt token to the prompt's sections.")
    distributed: DistributedConfig = doc(factory=DistributedConfig,
                                         help="Sharding over processes (torchrun ranks or --shard I/N).")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        _validate(self)
        return self


# --------------------------------------------------------------------------- building

def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a parsed JSON/TOML/CLI value to the declared type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if isinstance(value, str):
            value = _parse_literal(value, where)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table of fields, got {value!r}")
        return _build(tp, value, where)
    raise ConfigError(f"{where}: unsupported type {tp}")


def _parse_literal(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if "," in text:
            return [t.strip() for t in text.split(",")]
        raise ConfigError(f"{where}: could not parse {text!r} as a JSON list") from None


def _build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    types = _field_types(cls)
    unknown = sorted(set(data) - set(types))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + u for u in unknown)}; "
            f"valid keys{' in ' + where if where else ''}: {', '.join(sorted(types))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, types[name], f"{where}.{name}" if where else name)
    base = cls()
    for name, value in kwargs.items():
        if dataclasses.is_dataclass(types[name]) and isinstance(value, dict):
            value = _build(types[name], value, name)
        setattr(base, name, value)
    return base


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build a Config from a (possibly partial) nested dict; unknown keys raise ConfigError."""
    return _build(Config, data).validate()


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        return json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}") from None


def parse_override(item: str) -> tuple[list[str], str]:
    """'generation.temperature=0.5' -> (['generation', 'temperature'], '0.5')."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.field=value")
    key, value = item.split("=", 1)
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Merge ``section.field=value`` strings into a nested dict (values stay strings; _coerce types them)."""
    data = json.loads(json.dumps(data))
    sections = _field_types(Config)
    for item in overrides:
        path, value = parse_override(item)
        if len(path) != 2 or path[0] not in sections:
            raise ConfigError(
                f"override key {'.'.join(path)!r} must be section.field with section one of: {', '.join(sections)}"
            )
        data.setdefault(path[0], {})[path[1]] = value
    return data


def resolve_config(file: str | Path | None = None, overrides: list[str] | None = None,
                   base: dict[str, Any] | None = None) -> Config:
    """Defaults <- base dict <- file <- overrides."""
    data: dict[str, Any] = json.loads(json.dumps(base or {}))
    if file is not None:
        for section, values in load_config_file(file).items():
            if isinstance(values, dict):
                data.setdefault(section, {}).update(values)
            else:
                data[section] = values
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data)


def _validate(cfg: Config) -> None:
    if cfg.output.save_format not in ("json", "parquet", "both"):
        raise ConfigError(f"output.save_format must be json, parquet or both, not {cfg.output.save_format!r}")
    if cfg.checkpoint.resume not in ("ask", "auto", "never"):
        raise ConfigError(f"checkpoint.resume must be ask, auto or never, not {cfg.checkpoint.resume!r}")
    fr = cfg.data.split_fractions
    if any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ConfigError(f"data.split_fractions must be non-negative and sum to 1, got {fr}")
    g = cfg.generation
    if g.temperature < 0:
        raise ConfigError(f"generation.temperature must be >= 0, got {g.temperature}")
    if g.batch_size < 0:
        raise ConfigError(f"generation.batch_size must be >= 0 (0 = automatic), got {g.batch_size}")
    for name in ("max_new_tokens", "n_samples"):
        if getattr(g, name) < 1:
            raise ConfigError(f"generation.{name} must be >= 1, got {getattr(g, name)}")
    if g.n_samples > 1 and g.temperature == 0:
        raise ConfigError("generation.n_samples > 1 needs generation.temperature > 0 (greedy samples are identical)")
    if g.overlap not in ("auto", "on", "off"):
        raise ConfigError(f"generation.overlap must be auto, on or off, not {g.overlap!r}")
    if g.backend not in ("auto", "hf", "fast"):
        raise ConfigError(f"generation.backend must be auto, hf or fast, not {g.backend!r}")
    if g.attention not in ("eager", "flex"):
        raise ConfigError(f"generation.attention must be eager or flex, not {g.attention!r}")
    if g.schedule not in ("auto", "batches", "queue"):
        raise ConfigError(f"generation.schedule must be auto, batches or queue, not {g.schedule!r}")
    if g.schedule == "queue" and g.backend == "hf":
        raise ConfigError("generation.schedule='queue' (continuous batching) runs on the fast decoder: set "
                          "generation.backend=fast (or auto on CUDA), or generation.schedule=batches")
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"generation.top_p must be in (0, 1], got {g.top_p}")
    if cfg.checkpoint.every_n_records < 1:
        raise ConfigError("checkpoint.every_n_records must be >= 1")
    if cfg.data.dataset not in DATASETS:
        raise ConfigError(f"data.dataset must be one of {', '.join(DATASETS)}, not {cfg.data.dataset!r}")
    if cfg.prompt.style not in PROMPT_STYLES:
        raise ConfigError(f"prompt.style must be one of {', '.join(PROMPT_STYLES)}, not {cfg.prompt.style!r}")
    if cfg.prompt.style == "signature" and cfg.data.dataset != "humaneval":
        raise ConfigError("prompt.style='signature' is HumanEval's own prompt: set data.dataset=humaneval, or use "
                          "prompt.style=tests")
    if cfg.data.start_idx < 0:
        raise ConfigError(f"data.start_idx (--start) must be >= 0, got {cfg.data.start_idx}")
    if cfg.data.end_idx is not None and cfg.data.end_idx < cfg.data.start_idx:
        raise ConfigError(f"data.end_idx (--end, inclusive) must be >= data.start_idx (--start): got start "
                          f"{cfg.data.start_idx}, end {cfg.data.end_idx}")
    a = cfg.analysis
    if a.site not in SITES:
        raise ConfigError(f"analysis.site must be one of {SITES}, not {a.site!r}")
    if not 0 < a.general_max_frequency <= 1:
        raise ConfigError(f"analysis.general_max_frequency must be in (0, 1], got {a.general_max_frequency}")
    _validate_validation(cfg.validation)
    _validate_steering(cfg.steering)
    _validate_ablation(cfg.ablation)
    _validate_attention(cfg.attention)
    _validate_distributed(cfg.distributed)
    try:
        check_template(cfg.prompt.template)
    except PromptError as exc:
        raise ConfigError(f"prompt.template: {exc}") from None


def _validate_validation(v: ValidationConfig) -> None:
    if v.selection_metric not in ("t", "separation"):
        raise ConfigError(f"validation.selection_metric must be t or separation, not {v.selection_metric!r}")
    if v.bootstrap_resamples < 10:
        raise ConfigError(f"validation.bootstrap_resamples must be >= 10, got {v.bootstrap_resamples}")
    if not 0 < v.ci_level < 1:
        raise ConfigError(f"validation.ci_level must be in (0, 1), got {v.ci_level}")
    if v.probe_folds < 2 or v.probe_cs < 1:
        raise ConfigError("validation.probe_folds must be >= 2 and validation.probe_cs >= 1")
    if any(t < 0 for t in v.temperatures) or len(set(v.temperatures)) != len(v.temperatures):
        raise ConfigError(f"validation.temperatures must be distinct and >= 0, got {v.temperatures}")
    if v.samples_per_temperature < 1 or v.robustness_max_tasks < 0:
        raise ConfigError("validation.samples_per_temperature must be >= 1 and validation.robustness_max_tasks >= 0")


def _validate_steering(s: SteeringConfig) -> None:
    choices = {"selection_metric": ("separation", "t"), "normalize": ("unit", "raw"),
               "alpha_units": ("residual_norm", "absolute"), "positions": ("all", "prompt", "generated"),
               "speculate": ("auto", "on", "off")}
    for name, allowed in choices.items():
        if getattr(s, name) not in allowed:
            raise ConfigError(f"steering.{name} must be one of {', '.join(allowed)}, not {getattr(s, name)!r}")
    if s.site is not None and s.site not in SITES:
        raise ConfigError(f"steering.site must be one of {SITES} or None, not {s.site!r}")
    if not s.alpha_grid or any(a <= 0 for a in s.alpha_grid):
        raise ConfigError(f"steering.alpha_grid must hold positive values, got {s.alpha_grid}")
    if s.n_controls < 2 or s.refine_steps < 0 or min(s.max_tasks, s.tuning_max_tasks, s.tuning_controls) < 0:
        raise ConfigError("steering.n_controls must be >= 2 (half latent, half random controls); refine_steps, "
                          "tuning_controls and the *max_tasks fields >= 0")
    if s.target not in ("latent", "random") and not (s.target.startswith("unembed:") and len(s.target) > 8):
        raise ConfigError(f"steering.target must be 'latent', 'random' or 'unembed:<token>', not {s.target!r}")
    if s.n_permutations < 100 or s.bootstrap_resamples < 100:
        raise ConfigError("steering.n_permutations and steering.bootstrap_resamples must be >= 100")
    if not 0 <= s.max_corruption <= 1 or not 0 < s.ci_level < 1:
        raise ConfigError("steering.max_corruption must be in [0, 1] and steering.ci_level in (0, 1)")


ABLATION_METHODS = ("weights", "write_hooks", "residual_hooks")


def _validate_ablation(a: AblationConfig) -> None:
    if a.method not in ABLATION_METHODS:
        raise ConfigError(f"ablation.method must be one of {', '.join(ABLATION_METHODS)}, not {a.method!r}")
    if a.compare_max_tasks < 0 or a.residual_check_tasks < 0 or a.n_random_controls < -1:
        raise ConfigError("ablation.compare_max_tasks and ablation.residual_check_tasks must be >= 0, "
                          "ablation.n_random_controls >= -1 (-1 = as many as the steering stage's)")


def _validate_distributed(d: DistributedConfig) -> None:
    match = re.fullmatch(r"(\d+)/(\d+)", d.shard.replace(" ", "")) if d.shard else None
    if d.shard and (match is None or not int(match.group(1)) < int(match.group(2))):
        raise ConfigError(f"distributed.shard must be I/N with 0 <= I < N (e.g. 0/4), not {d.shard!r}")
    if d.timeout_s <= 0:
        raise ConfigError(f"distributed.timeout_s must be > 0, got {d.timeout_s}")


def _validate_attention(a: AttentionConfig) -> None:
    if a.max_tasks < 0 or a.batch_size < 1:
        raise ConfigError("attention.max_tasks must be >= 0 (0 = all) and attention.batch_size >= 1")
    if a.bootstrap_resamples < 100 or not 0 < a.ci_level < 1:
        raise ConfigError("attention.bootstrap_resamples must be >= 100 and attention.ci_level in (0, 1)")


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) for every leaf field: the source of `pva-sae config`."""
    rows = []
    types = _field_types(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        tp = types[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key + "."))
        else:
            rows.append((key, _type_name(tp), getattr(instance, f.name), f.metadata.get("help", "")))
    return rows


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def record_fields_differing(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted names of the build-section fields that differ and can change the records."""
    saved = with_defaults(saved)
    return [k for k in diff_configs({s: saved.get(s) for s in BUILD_SECTIONS}, {s: current.get(s) for s in BUILD_SECTIONS})
            if k not in NON_RECORD_FIELDS]


def with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config completed with today's defaults for fields it does not have.

    A field added after a run was made defaults to the behaviour the run had (that is the rule for every new
    field), so a run directory written before the field existed still compares equal to a config that keeps
    the default; a value the saved config does have always wins."""
    return _merge_missing(Config().to_dict(), saved)


def _merge_missing(defaults: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    out = dict(saved)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _merge_missing(value, out[key])
    return out


def diff_configs(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        name = f"{prefix}{key}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(diff_configs(va, vb, name + "."))
        elif _norm(va) != _norm(vb):
            out.append(name)
    return out


def _norm(v: Any) -> Any:
    return json.loads(json.dumps(v))
