"""The fast decoder reproduces transformers' greedy generation (plain and steered), on CPU and GPU."""

import pytest
import torch

from pva_sae.config import GenerationConfig, ModelConfig
from pva_sae.model.fastgen import FastGenError, StaticDecoder, Steering
from pva_sae.model.generation import Generator

PROMPTS = ["def add(a, b):", "import os\n# list the files in a directory\ndef", "x = [1, 2, 3]\nfor",
           "class Stack:\n    def __init__(self):"]


def mbpp_batch(n=8, start=0):
    from pva_sae.data import mbpp as data
    from pva_sae.data import prompts

    tasks = data.load_tasks("packaged")[start:start + n]
    return [(t.task_id, 0, prompts.build_prompt(t, "{text}\n\n{tests}\n\n{initiator}", "# Solution:")) for t in tasks]


def samples(loaded, batch, steering=None, **gen):
    out = {}
    for backend in ("hf", "fast"):
        g = Generator(loaded, GenerationConfig(backend=backend, **gen))
        out[backend] = [(s.completion, s.n_new_tokens, s.finish_reason) for s in g.generate_batch(batch, 0, steering)]
    return out


def test_greedy_equals_generate_on_the_tiny_random_model(tiny_loaded):
    got = samples(tiny_loaded, [(i, 0, p) for i, p in enumerate(PROMPTS)], max_new_tokens=24, stop_strings=())
    assert got["fast"] == got["hf"]
    assert {n for _, n, _ in got["hf"]} == {24}


def test_greedy_with_stop_strings_equals_generate_on_the_default_model():
    from pva_sae.model.registry import load_model

    loaded = load_model(ModelConfig(name="pva-tiny", device="cpu"))
    got = samples(loaded, mbpp_batch(8), max_new_tokens=160)
    assert got["fast"] == got["hf"]
    assert {r for _, _, r in got["hf"]} & {"eos", "stop"}          # rows end at different steps


@pytest.mark.parametrize("site,positions", [("resid_post", "all"), ("resid_pre", "generated"),
                                            ("resid_post", "prompt")])
def test_steered_greedy_equals_the_steering_hook(tiny_loaded, site, positions):
    d = torch.randn(tiny_loaded.d_model, generator=torch.Generator().manual_seed(0))
    steering = Steering(1, d / d.norm(), 40.0, site=site, positions=positions)
    batch = [(i, 0, p) for i, p in enumerate(PROMPTS)]
    got = samples(tiny_loaded, batch, steering, max_new_tokens=16, stop_strings=())
    plain = samples(tiny_loaded, batch, None, max_new_tokens=16, stop_strings=())
    assert got["fast"] == got["hf"]
    assert got["fast"] != plain["fast"]


def test_sampling_is_seeded(tiny_loaded):
    g = Generator(tiny_loaded, GenerationConfig(backend="fast", temperature=1.0, max_new_tokens=12, stop_strings=()))
    batch = [(i, 0, p) for i, p in enumerate(PROMPTS)]
    a = [s.completion for s in g.generate_batch(batch, 3)]
    assert a == [s.completion for s in g.generate_batch(batch, 3)]
    assert a != [s.completion for s in g.generate_batch(batch, 4)]


def test_refuses_other_architectures(tiny_loaded):
    model = tiny_loaded.model
    with pytest.raises(FastGenError, match="Gemma-2 only"):
        StaticDecoder(type("M", (), {"config": replace_config(model.config, model_type="llama")})(), [1], 0)


def replace_config(config, **changes):
    import copy

    c = copy.copy(config)
    for k, v in changes.items():
        object.__setattr__(c, k, v)
    return c


@pytest.mark.gpu
def test_gpu_graph_greedy_equals_generate_in_float32_plain_and_steered():
    """float32 on CUDA: the captured-graph decoder gives generate's greedy output exactly."""
    from pva_sae.model.registry import load_model

    loaded = load_model(ModelConfig(name="pva-tiny", device="cuda", dtype="float32"))
    batch = mbpp_batch(32, start=100)
    got = samples(loaded, batch, max_new_tokens=200)
    assert got["fast"] == got["hf"]
    d = torch.randn(loaded.d_model, generator=torch.Generator().manual_seed(1))
    got = samples(loaded, batch, Steering(3, d / d.norm(), 4.0), max_new_tokens=200)
    assert got["fast"] == got["hf"]
    g = Generator(loaded, GenerationConfig(backend="auto"))
    assert g.backend == "fast" and g.fast.use_graph


@pytest.mark.gpu
def test_gpu_bfloat16_greedy_mostly_equals_generate():
    """bfloat16: attention over the static cache length and other GEMM shapes round differently from
    generate's growing cache, so near-ties can flip a row's continuation (measured: 57/64 rows identical
    over 200 tokens on the embedded default); a real bug would leave few rows equal."""
    from pva_sae.model.registry import load_model

    loaded = load_model(ModelConfig(name="pva-tiny", device="cuda"))
    batch = mbpp_batch(64, start=100)
    got = samples(loaded, batch, max_new_tokens=200)
    same = sum(a == b for a, b in zip(got["fast"], got["hf"]))
    print(f"bfloat16: {same}/{len(batch)} rows identical")
    assert same >= 0.8 * len(batch)


def test_chunked_prefill_and_single_token(tiny_loaded, monkeypatch):
    import pva_sae.model.fastgen as fg

    batch = [(i, 0, p) for i, p in enumerate(PROMPTS)]
    whole = samples(tiny_loaded, batch, max_new_tokens=10, stop_strings=())["fast"]
    monkeypatch.setattr(fg, "PREFILL_SCRATCH_BYTES", 1)          # one row per prefill chunk
    assert samples(tiny_loaded, batch, max_new_tokens=10, stop_strings=())["fast"] == whole
    one = samples(tiny_loaded, batch, max_new_tokens=1, stop_strings=())
    assert one["fast"] == one["hf"]


def test_decode_function_slots(tiny_loaded):
    """The path a torch.compile'd decoder takes (functions passed in) computes the same tokens."""
    import pva_sae.model.fastgen as fg

    ids = tiny_loaded.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    plain = StaticDecoder(tiny_loaded.model, [1], 0)
    slots = StaticDecoder(tiny_loaded.model, [1], 0)
    slots._decode_fns = (fg._qkv, fg._attend_mlp, fg._head)
    a = plain.generate(ids["input_ids"], ids["attention_mask"], 12)
    assert torch.equal(a, slots.generate(ids["input_ids"], ids["attention_mask"], 12))


# --------------------------------------------------------------------------- refusing what it cannot run


def altered(model, **config):
    import copy

    m = copy.deepcopy(model)
    for k, v in config.items():
        object.__setattr__(m.config, k, v)        # past the config's own validation, as a foreign model would be
    return m


@pytest.mark.parametrize("change,named", [
    ({"hidden_activation": "gelu"}, "hidden_activation"),
    ({"final_logit_softcapping": -1.0}, "final_logit_softcapping"),
    ({"attn_logit_softcapping": 0.0}, "attn_logit_softcapping"),
    ({"layer_types": ["full_attention"]}, "layer_types"),
    ({"query_pre_attn_scalar": 0}, "query_pre_attn_scalar"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "default RoPE"),
    ({"use_bidirectional_attention": True}, "causal"),
])
def test_construction_refuses_a_config_it_would_compute_differently(tiny_loaded, change, named):
    with pytest.raises(FastGenError, match=named) as err:
        StaticDecoder(altered(tiny_loaded.model, **change), [1], 0)
    assert "generation.backend='hf'" in str(err.value)


def test_construction_refuses_other_embedding_scales_and_norms(tiny_loaded):
    from torch import nn

    model = altered(tiny_loaded.model)
    embed = model.model.embed_tokens
    if not hasattr(embed, "embed_scale"):       # transformers < 5.x scales in the model's forward instead
        embed.embed_scale = torch.tensor(1.0)
    else:
        embed.embed_scale.fill_(1.0)
    with pytest.raises(FastGenError, match="embedding scale"):
        StaticDecoder(model, [1], 0)
    model = altered(tiny_loaded.model)
    model.model.layers[0].input_layernorm = nn.LayerNorm(tiny_loaded.d_model)
    with pytest.raises(FastGenError, match="RMSNorm"):
        StaticDecoder(model, [1], 0)
    model = altered(tiny_loaded.model)
    model.model.layers[1].mlp.up_proj.bias = nn.Parameter(torch.ones(model.model.layers[1].mlp.up_proj.out_features))
    with pytest.raises(FastGenError, match="bias"):
        StaticDecoder(model, [1], 0)


def test_build_time_parity_check_refuses_a_model_whose_forward_differs(tiny_loaded):
    """A change the config does not show (here a forward hook on a layer's MLP branch) is caught by the
    one-prefill check."""
    assert StaticDecoder(tiny_loaded.model, [1], 0).verify() < 1e-5
    model = altered(tiny_loaded.model)
    model.model.layers[0].post_feedforward_layernorm.register_forward_hook(lambda module, args, out: out * 1.5)
    with pytest.raises(FastGenError, match="differ from the model's own forward.*backend='hf'"):
        StaticDecoder(model, [1], 0)


def windowed(tiny_loaded, window):
    """The tiny model's weights with a sliding window of ``window`` tokens on its sliding layers."""
    import copy

    from transformers import Gemma2ForCausalLM

    config = copy.deepcopy(tiny_loaded.model.config)
    config.sliding_window = window
    model = Gemma2ForCausalLM._from_config(config, attn_implementation="eager").eval()
    model.load_state_dict(tiny_loaded.model.state_dict())
    assert "sliding_attention" in config.layer_types
    return model


def test_greedy_equals_generate_with_a_binding_sliding_window(tiny_loaded):
    """Window 5, prompts of up to ~20 tokens plus 24 new ones: every late query sees only part of the context."""
    from transformers import GenerationConfig as HFConfig

    model = windowed(tiny_loaded, 5)
    enc = tiny_loaded.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    new = 24
    assert enc["input_ids"].shape[1] + new > 5 * 4
    hf = HFConfig(max_new_tokens=new, do_sample=False, eos_token_id=1, pad_token_id=tiny_loaded.tokenizer.pad_token_id)
    with torch.inference_mode():
        expected = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                  generation_config=hf)
        unwindowed = tiny_loaded.model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                                generation_config=hf)
    fast = StaticDecoder(model, [1], tiny_loaded.tokenizer.pad_token_id)
    got = fast.generate(enc["input_ids"], enc["attention_mask"], new)
    assert got.shape == expected.shape and torch.equal(got, expected)
    assert not torch.equal(expected, unwindowed)                 # the window changes the text: it binds
    queue = fast.generate_queue(prompt_ids(tiny_loaded, PROMPTS), new, slots=2)
    assert [toks for toks, _ in queue] == rows_of(got, enc, [1], tiny_loaded.tokenizer.pad_token_id)


# --------------------------------------------------------------------------- continuous batching


def prompt_ids(loaded, texts):
    return [loaded.tokenizer(t)["input_ids"] for t in texts]


def rows_of(out, enc, eos, pad):
    """Each row's new tokens from ``generate``'s layout, up to and including its EOS."""
    p = enc["input_ids"].shape[1]
    rows = []
    for row in out[:, p:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:end])
    return rows


QUEUE = PROMPTS + ["def fib(n):\n    if n < 2:", "# reverse a string\ndef rev(s):", "y = {}\nfor k in", "while"]


@pytest.mark.parametrize("pipeline", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_continuous_batching_equals_per_row_generation(tiny_loaded, temperature, pipeline):
    """Any slot count gives each prompt what it gets alone (greedy and keyed sampling, float32); EOS rows free
    their slot early (EOS ids chosen so rows end at different steps). Pipelined (the host reads one window while
    the device decodes the next, so ended rows decode one window more) or not, the rows are the same."""
    tok = tiny_loaded.tokenizer
    ids = prompt_ids(tiny_loaded, QUEUE)
    keys = [1000 + i for i in range(len(QUEUE))]
    pad = tok.pad_token_id
    alone_runs = []
    probe = StaticDecoder(tiny_loaded.model, [1], pad)
    first = probe.generate_queue(ids, 30, slots=len(ids), temperature=temperature, keys=keys)
    eos = sorted({toks[len(toks) // 2] for toks, _ in first[::2]})[:3]      # tokens some rows produce mid-way
    dec = StaticDecoder(tiny_loaded.model, eos, pad, check_every=4)
    dec.queue_pipeline = pipeline
    for i, p in enumerate(ids):
        enc = tok([QUEUE[i]], return_tensors="pt")
        out = dec.generate(enc["input_ids"], enc["attention_mask"], 30, temperature=temperature, row_keys=[keys[i]])
        alone_runs.append(rows_of(out, enc, eos, pad)[0])
    for slots in (1, 3, 5):
        got = dec.generate_queue(ids, 30, slots=slots, temperature=temperature, keys=keys)
        assert [toks for toks, _ in got] == alone_runs, slots
    reasons = [r for _, r in got]
    assert "eos" in reasons and "length" in reasons
    enc = tok(QUEUE, return_tensors="pt", padding=True)
    batch = dec.generate(enc["input_ids"], enc["attention_mask"], 30, temperature=temperature, row_keys=keys)
    assert rows_of(batch, enc, eos, pad) == alone_runs                        # static batch, left padded
    if temperature:
        other = dec.generate_queue(ids, 30, slots=3, temperature=temperature, keys=[k + 1 for k in keys])
        assert [t for t, _ in other] != alone_runs


@pytest.mark.parametrize("pipeline", [False, True])
def test_continuous_batching_stop_strings_and_steering(tiny_loaded, pipeline):
    """A row ended by the stop check frees its slot; steering at generated positions applies to refilled slots.
    Pipelined, the stop check is asked about each row's steps in order, every step exactly once, and never about
    a row's tokens after the step it ended at."""
    pad = tiny_loaded.tokenizer.pad_token_id
    ids = prompt_ids(tiny_loaded, QUEUE)
    d = torch.randn(tiny_loaded.d_model, generator=torch.Generator().manual_seed(0))
    steering = Steering(1, d / d.norm(), 40.0, site="resid_post", positions="generated")
    dec = StaticDecoder(tiny_loaded.model, [1], pad, check_every=3)
    dec.queue_pipeline = pipeline
    plain = dec.generate_queue(ids, 20, slots=len(ids))
    stop_at = {i: 4 + i % 5 for i in range(len(ids))}
    asked: dict[int, list[tuple[int, int]]] = {}

    def stop_check(requests):
        for item, new, first in requests:
            asked.setdefault(item, []).append((first, len(new)))
        return [stop_at[item] if stop_at[item] < len(new) else None for item, new, _ in requests]

    stopped = dec.generate_queue(ids, 20, slots=2, stop_check=stop_check)
    assert [(t, r) for t, r in stopped] == [(t[:stop_at[i] + 1], "stop") for i, (t, _) in enumerate(plain)]
    for item, spans in asked.items():
        assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:])), (item, spans)
        assert spans[-1][1] > stop_at[item] and all(end <= stop_at[item] for _, end in spans[:-1]), (item, spans)
    steered_alone = []
    for i, p in enumerate(QUEUE):
        enc = tiny_loaded.tokenizer([p], return_tensors="pt")
        out = dec.generate(enc["input_ids"], enc["attention_mask"], 20, steering=steering)
        steered_alone.append(rows_of(out, enc, [1], pad)[0])
    steered = dec.generate_queue(ids, 20, slots=3, steering=steering)
    assert [t for t, _ in steered] == steered_alone
    assert steered_alone != [t for t, _ in plain]
    reported = []
    dec.generate_queue(ids, 20, slots=3, steering=steering, on_finish=reported.extend)
    assert sorted(reported) == sorted((i, t, r) for i, (t, r) in enumerate(steered))   # each row once


def test_queue_check_interval_is_fixed_by_model_size_and_does_not_change_outputs(tiny_loaded, monkeypatch):
    """A small model checks its queue every 2 x check_every steps, a large one every check_every (by parameter
    count, so a run's schedule is fixed); the interval changes when slots are refilled, never a row's tokens."""
    import pva_sae.model.fastgen as fastgen

    pad = tiny_loaded.tokenizer.pad_token_id
    ids = prompt_ids(tiny_loaded, QUEUE)
    small = StaticDecoder(tiny_loaded.model, [1], pad, check_every=3)
    assert small.queue_check_every == 6
    monkeypatch.setattr(fastgen, "SMALL_MODEL_PARAMS", 1)
    large = StaticDecoder(tiny_loaded.model, [1], pad, check_every=3)
    assert large.queue_check_every == 3
    assert large.generate_queue(ids, 20, slots=2) == small.generate_queue(ids, 20, slots=2)


@pytest.mark.parametrize("pipeline", [False, True])
def test_generator_queue_matches_generate_batch_greedy(tiny_loaded, pipeline):
    """The Generator's continuous-batching entry point gives generate_batch's samples (greedy, stop strings),
    pipelined or not."""
    batch = mbpp_batch(6)
    cfg = GenerationConfig(backend="fast", max_new_tokens=48)
    g = Generator(tiny_loaded, cfg)
    g.fast.queue_pipeline = pipeline
    by_batch = [(s.task_id, s.completion, s.n_new_tokens, s.finish_reason) for s in g.generate_batch(batch, 0)]
    queued = g.generate_queue(batch, 0, slots=2)
    assert [(s.task_id, s.completion, s.n_new_tokens, s.finish_reason) for s in queued] == by_batch
    with pytest.raises(FastGenError, match="continuous batching runs on the fast decoder"):
        Generator(tiny_loaded, GenerationConfig(backend="hf", max_new_tokens=4)).generate_queue(batch, 0)


@pytest.mark.gpu
def test_gpu_continuous_batching_equals_per_row_in_float32():
    """CUDA graphs, float32: the queue gives each prompt its per-row result, greedy and keyed sampling, steered."""
    from pva_sae.model.registry import load_model

    loaded = load_model(ModelConfig(name="pva-tiny", device="cuda", dtype="float32"))
    batch = mbpp_batch(48, start=50)
    d = torch.randn(loaded.d_model, generator=torch.Generator().manual_seed(1))
    for gen, steering in (({}, None), ({"temperature": 0.8, "top_p": 0.95}, None),
                          ({}, Steering(3, d / d.norm(), 4.0))):
        g = Generator(loaded, GenerationConfig(backend="fast", max_new_tokens=160, **gen))
        alone = [g.generate_queue([item], 0, slots=1, steering=steering)[0] for item in batch]
        queued = g.generate_queue(batch, 0, slots=16, steering=steering)
        key = lambda s: (s.task_id, s.completion, s.n_new_tokens, s.finish_reason)  # noqa: E731
        assert [key(s) for s in queued] == [key(s) for s in alone]
        assert g.fast.use_graph


def test_continuous_batching_length_buckets_keep_results(tiny_loaded, monkeypatch):
    """Prompts split into several length buckets (each its own cache length) get the same tokens."""
    import pva_sae.model.fastgen as fg

    ids = prompt_ids(tiny_loaded, QUEUE)
    dec = StaticDecoder(tiny_loaded.model, [1], tiny_loaded.tokenizer.pad_token_id)
    one_bucket = dec.generate_queue(ids, 10, slots=3)
    monkeypatch.setattr(fg, "QUEUE_MIN_WIDTH", 1)
    widths = {1 << (len(p) + 10 - 1).bit_length() for p in ids}
    assert len(widths) > 1
    assert dec.generate_queue(ids, 10, slots=3) == one_bucket


def test_bench_gpu_script_runs_at_toy_size_on_cpu(tmp_path):
    """scripts/bench_gpu.py --toy: every part runs, each generation figure carries its roofline fraction, and
    static and continuous batching produce the workload's tokens."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--toy", "--skip", "thesis", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["device_measured"]["copy_bandwidth_bytes_per_s"] > 0
    generation = [r for r in results["rows"] if "tokens_per_s" in r]
    assert generation and all(r["roofline"] > 0 for r in generation)
    work = [r for r in results["rows"] if r["approach"].startswith("workload")]
    assert len(work) == 2 and work[0]["useful_tokens"] == work[1]["useful_tokens"] > 0
    checks = [r for r in results["rows"] if r["approach"].startswith("check")]
    assert checks and all(r["identical_rows"] == r["rows"] for r in checks)


def test_attention_over_the_filled_cache_only_keeps_results(tiny_loaded, monkeypatch):
    """Steps attending over the filled part of the cache (4-position buckets, so the length changes every few
    steps) give the tokens of steps attending over the whole static cache, static and continuous."""
    import pva_sae.model.fastgen as fg

    pad = tiny_loaded.tokenizer.pad_token_id
    enc = tiny_loaded.tokenizer(QUEUE, return_tensors="pt", padding=True)
    ids = prompt_ids(tiny_loaded, QUEUE)
    monkeypatch.setattr(fg, "KV_BUCKET", 10 ** 6)                 # every step over the whole cache
    dec = StaticDecoder(tiny_loaded.model, [1], pad, check_every=3)
    whole = dec.generate(enc["input_ids"], enc["attention_mask"], 16, temperature=1.0, row_keys=list(range(8)))
    whole_queue = dec.generate_queue(ids, 16, slots=3)
    monkeypatch.setattr(fg, "KV_BUCKET", 4)
    assert torch.equal(dec.generate(enc["input_ids"], enc["attention_mask"], 16, temperature=1.0,
                                    row_keys=list(range(8))), whole)
    assert dec.generate_queue(ids, 16, slots=3) == whole_queue


def test_construction_accepts_a_width_whose_embedding_scale_bfloat16_rounds():
    """sqrt(d_model) is not exact in bfloat16 for most widths (gemma-2-9b: sqrt(3584) = 59.87 -> 59.75); transformers
    multiplies by the rounded value and so does the decoder, so the check compares the rounded scales."""
    from transformers import Gemma2ForCausalLM

    from pva_sae.default.tiny import tiny_gemma2_config

    cfg = tiny_gemma2_config(vocab_size=64, n_layers=1, d_model=72, n_heads=2)
    assert float(torch.tensor(72 ** 0.5, dtype=torch.bfloat16)) != 72 ** 0.5
    model = Gemma2ForCausalLM(cfg).to(torch.bfloat16).eval()
    StaticDecoder(model, [1], 0)


# --------------------------------------------------------------------------- per-prompt steering in one queue


def mixed_steerings(d_model, site, positions, n):
    """Per prompt: two directions at opposite alphas, alpha 0 and no steering, in turn (one layer, site, positions)."""
    g = torch.Generator().manual_seed(7)
    a, b = (v / v.norm() for v in torch.randn(2, d_model, generator=g))
    cycle = [Steering(1, a, 40.0, site, positions), None, Steering(1, b, -30.0, site, positions),
             Steering(1, a, 0.0, site, positions)]
    return [cycle[i % len(cycle)] for i in range(n)]


@pytest.mark.parametrize("temperature,site,positions", [(0.0, "resid_post", "all"), (1.0, "resid_pre", "generated"),
                                                        (0.0, "resid_post", "prompt")])
def test_queue_with_per_prompt_steering_equals_each_prompt_alone(tiny_loaded, temperature, site, positions):
    """One queue, each prompt its own steering (or none, or alpha 0): every row gets what ``generate`` gives that
    prompt alone under that steering; the unsteered and alpha-0 rows get the unsteered tokens exactly."""
    tok = tiny_loaded.tokenizer
    pad = tok.pad_token_id
    ids = prompt_ids(tiny_loaded, QUEUE)
    keys = [2000 + i for i in range(len(QUEUE))]
    steerings = mixed_steerings(tiny_loaded.d_model, site, positions, len(QUEUE))
    dec = StaticDecoder(tiny_loaded.model, [1], pad, check_every=3)
    alone = []
    for i, text in enumerate(QUEUE):
        enc = tok([text], return_tensors="pt")
        out = dec.generate(enc["input_ids"], enc["attention_mask"], 20, steering=steerings[i], temperature=temperature,
                           row_keys=[keys[i]])
        alone.append(rows_of(out, enc, [1], pad)[0])
    finished = []
    got = dec.generate_queue(ids, 20, slots=3, steering=steerings, temperature=temperature, keys=keys,
                             on_finish=finished.extend)
    assert [t for t, _ in got] == alone
    assert sorted(i for i, _, _ in finished) == list(range(len(QUEUE)))       # each row reported once, as it ended
    assert all((t, r) == tuple(got[i]) for i, t, r in finished)
    plain = [t for t, _ in dec.generate_queue(ids, 20, slots=3, temperature=temperature, keys=keys)]
    unsteered = [i for i, s in enumerate(steerings) if s is None or s.alpha == 0]
    steered = [i for i in range(len(QUEUE)) if i not in unsteered]
    assert [alone[i] for i in unsteered] == [plain[i] for i in unsteered]
    assert [alone[i] for i in steered] != [plain[i] for i in steered]        # the steering rows do steer


def test_queue_refuses_steerings_at_different_layers_or_sites(tiny_loaded):
    dec = StaticDecoder(tiny_loaded.model, [1], tiny_loaded.tokenizer.pad_token_id)
    ids = prompt_ids(tiny_loaded, PROMPTS[:2])
    d = torch.ones(tiny_loaded.d_model)
    for other in (Steering(0, d, 1.0), Steering(1, d, 1.0, site="resid_pre"), Steering(1, d, 1.0, positions="prompt")):
        with pytest.raises(ValueError, match="share the steering layer, site and positions"):
            dec.generate_queue(ids, 4, slots=2, steering=[Steering(1, d, 1.0), other])
    with pytest.raises(ValueError, match="1 steerings for 2 prompts"):
        dec.generate_queue(ids, 4, slots=2, steering=[None])


@pytest.mark.parametrize("pipeline", [False, True])
def test_generator_queue_with_per_item_steering_equals_generate_batch(tiny_loaded, pipeline):
    """Generator.generate_queue with one steering per item gives each item generate_batch's sample under its
    steering (greedy, stop strings), and hands every sample to ``on_samples`` once, as its row ends."""
    batch = mbpp_batch(6)
    g = Generator(tiny_loaded, GenerationConfig(backend="fast", max_new_tokens=40))
    g.fast.queue_pipeline = pipeline
    steerings = mixed_steerings(tiny_loaded.d_model, "resid_post", "all", len(batch))
    key = lambda s: (s.task_id, s.completion, s.n_new_tokens, s.finish_reason)  # noqa: E731
    alone = [key(g.generate_batch([item], 0, steering)[0]) for item, steering in zip(batch, steerings)]
    seen = []
    queued = g.generate_queue(batch, 0, steering=steerings, slots=2, on_samples=seen.extend)
    assert [key(s) for s in queued] == alone
    assert sorted(i for i, _ in seen) == list(range(len(batch))) and all(queued[i] is s for i, s in seen)
    assert sum(s.gen_time_s for s in queued) > 0
    assert alone != [key(s) for s in g.generate_batch(batch, 0)]


@pytest.mark.gpu
def test_gpu_queue_with_per_prompt_steering_equals_each_prompt_alone():
    """CUDA graphs: one queue of prompts with different steerings (and none) gives each prompt its own steered
    result. float32: exactly, greedy and keyed sampling. bfloat16: a row's rounding depends on the shapes it runs
    in (prefill padded to the chunk's longest prompt, GEMM row counts), so near-ties can flip a continuation, as
    for static batches against ``generate`` (see test_gpu_bfloat16_greedy_mostly_equals_generate): at least 80%
    of the rows equal (steering added to the wrong rows would leave about half equal: the unsteered ones)."""
    from pva_sae.model.registry import load_model

    key = lambda s: (s.task_id, s.completion, s.n_new_tokens, s.finish_reason)  # noqa: E731
    batch = mbpp_batch(48, start=50)
    for dtype in ("float32", "bfloat16"):
        loaded = load_model(ModelConfig(name="pva-tiny", device="cuda", dtype=dtype))
        g_d = torch.Generator().manual_seed(3)
        a, b = (v / v.norm() for v in torch.randn(2, loaded.d_model, generator=g_d))
        cycle = [Steering(3, a, 4.0), None, Steering(3, b, -4.0), Steering(3, a, 0.0)]
        steerings = [cycle[i % 4] for i in range(len(batch))]
        for gen in ({}, {"temperature": 0.8, "top_p": 0.95}):
            g = Generator(loaded, GenerationConfig(backend="fast", max_new_tokens=160, **gen))
            alone = [key(g.generate_queue([item], 0, steering=s, slots=1)[0]) for item, s in zip(batch, steerings)]
            queued = [key(s) for s in g.generate_queue(batch, 0, steering=steerings, slots=16)]
            assert g.fast.use_graph
            same = sum(x == y for x, y in zip(queued, alone))
            print(f"{dtype} {gen or 'greedy'}: {same}/{len(batch)} rows identical")
            if dtype == "float32":
                assert queued == alone
            else:
                assert same >= 0.8 * len(batch)


# --------------------------------------------------------------------------- FlexAttention


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("window", [None, 5])
def test_flex_attention_masks_and_soft_cap_equal_eager(tiny_loaded, monkeypatch, window):
    """The FlexAttention path's score_mod (soft-cap) and mask_mod (left padding, causality, sliding window, per-row
    queue positions) give the eager path's tokens: static batches, the queue, steering, keyed sampling. On CPU the
    uncompiled FlexAttention evaluates the mask densely, so this checks the masks, not the block counts (the GPU
    test below does, compiled)."""
    import pva_sae.model.fastgen as fg

    monkeypatch.setattr(torch, "compile", lambda f, **_: f)      # the CPU compiler has no FlexAttention template
    monkeypatch.setattr(fg, "FLEX_BLOCK", 4)
    model = windowed(tiny_loaded, window) if window else tiny_loaded.model
    pad = tiny_loaded.tokenizer.pad_token_id
    eager = StaticDecoder(model, [1], pad)
    flex = StaticDecoder(model, [1], pad, attention="flex")
    assert flex.attention == "flex" and flex._cap_arg is not None
    enc = tiny_loaded.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert not bool(enc["attention_mask"].all())                  # left padding in the batch
    assert torch.equal(flex.generate(enc["input_ids"], enc["attention_mask"], 24),
                       eager.generate(enc["input_ids"], enc["attention_mask"], 24))
    ids = prompt_ids(tiny_loaded, QUEUE)
    d = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    steer = [Steering(1, d, 3.0) if i % 2 else None for i in range(len(ids))]
    for kwargs in ({}, {"temperature": 0.9, "top_p": 0.9, "keys": list(range(len(ids)))}):
        assert (flex.generate_queue(ids, 20, 3, steering=steer, **kwargs)
                == eager.generate_queue(ids, 20, 3, steering=steer, **kwargs))


def test_flex_attention_is_refused_off_cuda_and_unknown_kernels_are_refused(tiny_loaded):
    from pva_sae.config import ConfigError, config_from_dict

    with pytest.raises(FastGenError, match="attention='flex' needs CUDA"):
        Generator(tiny_loaded, GenerationConfig(backend="fast", attention="flex"))
    assert Generator(tiny_loaded, GenerationConfig(backend="fast")).fast.attention == "eager"   # the default
    with pytest.raises(ValueError, match="attention must be one of"):
        StaticDecoder(tiny_loaded.model, [1], 0, attention="sdpa")
    with pytest.raises(ConfigError, match="generation.attention must be eager or flex"):
        config_from_dict({"generation": {"attention": "sdpa"}})


@pytest.mark.gpu
def test_gpu_flex_attention_greedy_equals_generate():
    """Compiled FlexAttention on CUDA, decode blocks counted on the device inside the captured step (prompts of
    ~150-300 tokens + 200 new: several 128-position blocks). float32: generate's greedy output exactly, static
    batches and the queue, plain and steered. bfloat16: flex keeps the scores in float32 where eager rounds them,
    so near-ties can differ: at least 80% of the rows equal."""
    from pva_sae.model.registry import load_model

    for dtype in ("float32", "bfloat16"):
        loaded = load_model(ModelConfig(name="pva-tiny", device="cuda", dtype=dtype))
        batch = mbpp_batch(48, start=100)
        d = torch.randn(loaded.d_model, generator=torch.Generator().manual_seed(1))
        for steering in (None, Steering(3, d / d.norm(), 4.0)):
            hf = Generator(loaded, GenerationConfig(backend="hf", max_new_tokens=200))
            want = [(s.completion, s.n_new_tokens, s.finish_reason) for s in hf.generate_batch(batch, 0, steering)]
            g = Generator(loaded, GenerationConfig(backend="fast", attention="flex", max_new_tokens=200))
            assert g.fast.attention == "flex" and g.fast.use_graph
            got = [(s.completion, s.n_new_tokens, s.finish_reason) for s in g.generate_batch(batch, 0, steering)]
            queued = [(s.completion, s.n_new_tokens, s.finish_reason)
                      for s in g.generate_queue(batch, 0, steering=steering, slots=16)]
            same = sum(a == b for a, b in zip(got, want)), sum(a == b for a, b in zip(queued, want))
            print(f"flex {dtype} {'steered' if steering else 'plain'}: static {same[0]}/{len(batch)}, "
                  f"queue {same[1]}/{len(batch)} rows equal to generate")
            if dtype == "float32":
                assert got == want and queued == want
            else:
                assert min(same) >= 0.8 * len(batch)
