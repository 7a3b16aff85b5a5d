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
