"""Batch planning and generation on the tiny random Gemma-2 (CPU, float32)."""

import itertools

import pytest
import torch

from pva_sae.config import GenerationConfig, ModelConfig
from pva_sae.default.tiny import mbpp_texts
from pva_sae.model.generation import Generator, batch_seed, cut_at_stop, plan_batches
from pva_sae.model.registry import load_model

MAX_NEW = 20


@pytest.fixture(scope="module")
def prompts():
    """Twelve MBPP-shaped prompts of different token lengths, ending at the code initiator."""
    texts = itertools.islice(mbpp_texts(), 12)
    return [(task_id, text.split("# Solution:")[0] + "# Solution:") for task_id, text in enumerate(texts, start=1)]


def greedy(**overrides):
    return GenerationConfig(**{"max_new_tokens": MAX_NEW, "stop_strings": (), **overrides})


@pytest.fixture(scope="module")
def unstopped(tiny_loaded, prompts):
    """Greedy samples of all prompts in one batch, without stop strings."""
    return Generator(tiny_loaded, greedy()).generate_batch([(t, 0, p) for t, p in prompts], 0)


def token_texts(tokenizer, sample):
    ids = tokenizer(sample.prompt + sample.raw_completion)["input_ids"][sample.n_prompt_tokens:]
    return [tokenizer.decode([i]) for i in ids]


def pick_stop_string(tokenizer, samples):
    """A token text that first appears in the middle of some sample, so that sample must stop there."""
    for s in samples:
        pieces = token_texts(tokenizer, s)
        for k in range(2, len(pieces) - 2):
            text_before = "".join(pieces[:k])
            if pieces[k].strip() and pieces[k].isprintable() and pieces[k] not in text_before + pieces[k][:-1]:
                return s.task_id, k, pieces[k]
    pytest.fail("no usable stop string in the greedy outputs")


# --------------------------------------------------------------------------- plan


def test_plan_is_sorted_deterministic_and_complete(tiny_loaded, prompts):
    tok = tiny_loaded.tokenizer
    plan = plan_batches(prompts, tok, batch_size=5, n_samples=1)
    assert plan == plan_batches(list(reversed(prompts)), tok, batch_size=5, n_samples=1)
    assert [len(b) for b in plan] == [5, 5, 2]
    flat = [item for batch in plan for item in batch]
    lengths = [len(tok(p)["input_ids"]) for _, _, p in flat]
    assert lengths == sorted(lengths, reverse=True)
    assert sorted(t for t, _, _ in flat) == [t for t, _ in prompts]


def test_plan_ties_break_by_task_id(tiny_loaded):
    same = [(9, "x = 1"), (3, "y = 2"), (5, "z = 3")]
    plan = plan_batches(same, tiny_loaded.tokenizer, batch_size=2, n_samples=1)
    assert [[t for t, _, _ in b] for b in plan] == [[3, 5], [9]]


def test_plan_unsorted_keeps_input_order(tiny_loaded, prompts):
    plan = plan_batches(prompts, tiny_loaded.tokenizer, batch_size=4, n_samples=1, sort_by_length=False)
    assert [t for b in plan for t, _, _ in b] == [t for t, _ in prompts]


def test_plan_n_samples_gives_indices_0_to_n(tiny_loaded, prompts):
    plan = plan_batches(prompts[:3], tiny_loaded.tokenizer, batch_size=4, n_samples=3)
    flat = [(t, s) for b in plan for t, s, _ in b]
    assert len(flat) == 9 and len(set(flat)) == 9
    for task_id, _ in prompts[:3]:
        assert [s for t, s in flat if t == task_id] == [0, 1, 2]


def test_plan_refuses_duplicate_tasks(tiny_loaded):
    with pytest.raises(ValueError, match="same task_id twice"):
        plan_batches([(1, "a"), (1, "b")], tiny_loaded.tokenizer, 2, 1)


# --------------------------------------------------------------------------- greedy


def test_greedy_alone_equals_batched_with_longer_prompts(tiny_loaded, prompts, unstopped):
    """Left padding and the attention mask make padding invisible: in float32 the tokens are identical."""
    gen = Generator(tiny_loaded, greedy())
    shortest = min(unstopped, key=lambda s: s.n_prompt_tokens)
    assert shortest.n_prompt_tokens < max(s.n_prompt_tokens for s in unstopped)  # it really was padded
    for batched in [shortest, *unstopped[:3]]:
        alone = gen.generate_batch([(batched.task_id, 0, batched.prompt)], 0)[0]
        assert alone.raw_completion == batched.raw_completion
        assert (alone.n_new_tokens, alone.n_prompt_tokens) == (batched.n_new_tokens, batched.n_prompt_tokens)


def test_sample_fields(tiny_loaded, prompts, unstopped):
    tok = tiny_loaded.tokenizer
    for s, (task_id, prompt) in zip(unstopped, prompts):
        assert (s.task_id, s.sample_index, s.prompt, s.batch_index, s.temperature) == (task_id, 0, prompt, 0, 0.0)
        assert s.n_prompt_tokens == len(tok(prompt)["input_ids"])
        assert (s.finish_reason, s.n_new_tokens) == ("length", MAX_NEW)
        assert s.completion == s.raw_completion
    assert len({s.gen_time_s for s in unstopped}) == 1 and unstopped[0].gen_time_s > 0


# --------------------------------------------------------------------------- stop strings and EOS


def test_hf_stop_strings_stop_only_the_finished_row_under_left_padding(tiny_loaded, prompts, unstopped):
    """transformers' own stop_strings: the matching row is padded after its stop, the others run on."""
    tok, model = tiny_loaded.tokenizer, tiny_loaded.model
    task_id, k, stop = pick_stop_string(tok, unstopped)
    enc = tok([p for _, p in prompts], return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id)
    plain = model.generate(**enc, **kwargs)[:, enc["input_ids"].shape[1]:]
    stopped = model.generate(**enc, **kwargs, stop_strings=[stop], tokenizer=tok)[:, enc["input_ids"].shape[1]:]
    row = [t for t, _ in prompts].index(task_id)
    assert torch.equal(stopped[row, :k + 1], plain[row, :k + 1])
    assert (stopped[row, k + 1:] == tok.pad_token_id).all()
    for other, sample in enumerate(unstopped):
        if stop not in sample.raw_completion:
            assert torch.equal(stopped[other], plain[other])


def test_stop_strings_cut_completion_and_set_finish_reason(tiny_loaded, unstopped):
    task_id, k, stop = pick_stop_string(tiny_loaded.tokenizer, unstopped)
    gen = Generator(tiny_loaded, greedy(stop_strings=(stop, "never-generated")))
    stopped = gen.generate_batch([(s.task_id, 0, s.prompt) for s in unstopped], 0)
    for before, after in zip(unstopped, stopped):
        expected, found = cut_at_stop(before.raw_completion, [stop])
        assert after.completion == expected
        assert before.raw_completion.startswith(after.raw_completion)
        if found:
            assert after.finish_reason == "stop" and stop in after.raw_completion
        else:
            assert (after.finish_reason, after.raw_completion, after.n_new_tokens) == ("length",
                                                                                      before.raw_completion, MAX_NEW)
        if after.task_id == task_id:
            assert after.n_new_tokens == k + 1 and after.raw_completion.endswith(stop)


def test_eos_ends_a_row_and_is_not_text(tiny_model_dir, unstopped):
    loaded = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))  # a copy we may change
    task_id, k, stop = pick_stop_string(loaded.tokenizer, unstopped)
    eos_like = loaded.tokenizer.convert_tokens_to_ids(loaded.tokenizer.tokenize(stop))
    assert len(eos_like) == 1
    loaded.model.generation_config.eos_token_id = [loaded.tokenizer.eos_token_id, eos_like[0]]
    before = next(s for s in unstopped if s.task_id == task_id)
    after = Generator(loaded, greedy()).generate_batch([(task_id, 0, before.prompt)], 0)[0]
    assert (after.finish_reason, after.n_new_tokens) == ("eos", k + 1)
    assert before.raw_completion.startswith(after.raw_completion + stop)
    assert after.completion == after.raw_completion


def test_cut_at_stop_takes_the_earliest():
    assert cut_at_stop("x = 1\nprint(x)\nassert x", ["\nassert ", "\nprint("]) == ("x = 1", True)
    assert cut_at_stop("x = 1", ["\nassert "]) == ("x = 1", False)


# --------------------------------------------------------------------------- sampling


def sampled(loaded, batch, batch_index, **overrides):
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.0, stop_strings=(), **overrides)
    return [s.raw_completion for s in Generator(loaded, cfg).generate_batch(batch, batch_index)]


def test_sampling_is_reproducible_per_seed_and_batch(tiny_loaded, prompts):
    batch = [(t, 0, p) for t, p in prompts[:4]]
    first = sampled(tiny_loaded, batch, batch_index=3, seed=7)
    torch.manual_seed(12345)  # the global RNG must not matter ...
    state = torch.get_rng_state()
    assert sampled(tiny_loaded, batch, batch_index=3, seed=7) == first
    assert torch.equal(torch.get_rng_state(), state)  # ... nor be changed
    assert sampled(tiny_loaded, batch, batch_index=3, seed=8) != first
    assert sampled(tiny_loaded, batch, batch_index=4, seed=7) != first


def test_samples_of_one_task_differ(tiny_loaded, prompts):
    task_id, prompt = prompts[0]
    plan = plan_batches([(task_id, prompt)], tiny_loaded.tokenizer, batch_size=4, n_samples=4)
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.0, n_samples=4, stop_strings=())
    samples = Generator(tiny_loaded, cfg).generate_batch(plan[0], 0)
    assert [s.sample_index for s in samples] == [0, 1, 2, 3]
    assert len({s.raw_completion for s in samples}) > 1
    assert all(s.temperature == 1.0 for s in samples)


def test_batch_seed_is_stable():
    assert batch_seed(42, 0) == batch_seed(42, 0)
    assert len({batch_seed(s, b) for s in range(3) for b in range(3)}) == 9
    assert 0 <= batch_seed(2**40, 10**6) < 2**63


def test_model_generation_defaults_do_not_leak(tiny_model_dir, prompts):
    """A checkpoint asking for sampling (as Llama-3.1's does) must not turn greedy decoding into sampling."""
    loaded = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))
    batch = [(t, 0, p) for t, p in prompts[:2]]
    reference = [s.raw_completion for s in Generator(loaded, greedy()).generate_batch(batch, 0)]
    loaded.model.generation_config.do_sample = True
    loaded.model.generation_config.temperature = 5.0
    assert [s.raw_completion for s in Generator(loaded, greedy()).generate_batch(batch, 0)] == reference


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_cuda_bf16_generation_is_seeded_and_restores_rng(tiny_model_dir, prompts):
    loaded = load_model(ModelConfig(name=str(tiny_model_dir)))  # auto device and dtype
    assert loaded.device.type == "cuda" and loaded.dtype == torch.bfloat16
    assert next(loaded.model.parameters()).device.type == "cuda"
    assert loaded.model.config._attn_implementation == "eager"
    batch = [(t, 0, p) for t, p in prompts[:6]]
    cuda_state = torch.cuda.get_rng_state()
    first = sampled(loaded, batch, batch_index=1, seed=3)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
    assert sampled(loaded, batch, batch_index=1, seed=3) == first
    assert sampled(loaded, batch, batch_index=1, seed=4) != first
    greedy_samples = Generator(loaded, GenerationConfig(max_new_tokens=MAX_NEW)).generate_batch(batch, 0)
    assert all(s.finish_reason in ("stop", "eos", "length") and s.n_new_tokens >= 1 for s in greedy_samples)


def test_stop_hits_equal_the_criterion_on_every_prefix_and_the_criterion_is_built_once(tiny_loaded):
    """The vectorised stop check gives what calling transformers' criterion on each prefix gives (short prefixes
    included), and a second Generator on the same tokenizer reuses the criterion instead of rebuilding it."""
    from pva_sae.model.generation import stop_criterion, stop_hits

    tok = tiny_loaded.tokenizer
    stops = GenerationConfig().stop_strings
    criterion = stop_criterion(tok, stops)
    texts = ["def f(x):\n    return x\n\nassert f(1) == 1\n", "x = 1\nif __name__ == '__main__':\n    pass",
             "def g(): pass\n\n\n\n\nprint(g())"]
    ids = [tok(t)["input_ids"] for t in texts]
    width = max(map(len, ids)) + 4
    out = torch.full((len(ids), width), tok.pad_token_id if tok.pad_token_id is not None else 0)
    for i, x in enumerate(ids):
        out[i, width - len(x):] = torch.tensor(x)
    every = torch.stack([criterion(out[:, :end], None).bool() for end in range(1, width + 1)], dim=1)
    assert every.any(), "the texts hold stop strings: the check must find them"
    assert torch.equal(stop_hits(criterion, out, 1, width), every)
    assert torch.equal(stop_hits(criterion, out, 5, width - 1), every[:, 4:width - 1])
    first, second = (Generator(tiny_loaded, greedy(stop_strings=stops)) for _ in range(2))
    assert first._stop_criterion is second._stop_criterion is criterion


def test_stop_checks_skip_only_steps_the_criterion_cannot_flag():
    """The queue's stop check and ``stop_hits`` call the criterion only where its own tables say it can fire;
    on real solutions followed by stop strings, and on random ids (some beyond the vocabulary, some stop-string
    fragments), they find exactly the first step that calling the criterion on every prefix finds. Most steps of
    real code are skipped."""
    import random
    from importlib.resources import files

    from transformers import AutoTokenizer

    from pva_sae.data import mbpp
    from pva_sae.data import prompts as templates
    from pva_sae.model.generation import stop_candidates, stop_criterion, stop_hits

    tok = AutoTokenizer.from_pretrained(str(files("pva_sae") / "assets" / "default" / "model"))
    cfg = GenerationConfig(backend="hf")
    criterion = stop_criterion(tok, tuple(cfg.stop_strings))
    rng = random.Random(0)
    fragment = tok("\nassert ", add_special_tokens=False)["input_ids"]
    tails = ["\n\nassert f(1) == 2\n", "\nprint(x)\n", "\nif __name__ == '__main__':\n", "\n# end\n", "x  \n\n"]
    prompt_ids, news = [], []
    for t in mbpp.load_tasks("packaged")[:40]:
        prompt_ids.append(tok(templates.build_prompt(t))["input_ids"])
        news.append(tok(t.code + rng.choice(tails), add_special_tokens=False)["input_ids"])
    for _ in range(30):
        prompt_ids.append([rng.randrange(len(tok)) for _ in range(rng.randrange(1, 12))])
        news.append([rng.choice([rng.randrange(len(tok) + 5), *fragment]) for _ in range(rng.randrange(1, 40))])

    def first_flagged(p, n):
        return next((j for j in range(len(n)) if bool(criterion(torch.tensor([p + n[:j + 1]]), None)[0])), None)

    want = [first_flagged(p, n) for p, n in zip(prompt_ids, news)]
    assert sum(w is not None for w in want) >= 30
    g = Generator.__new__(Generator)
    g._stop_criterion, g._stop_memo = criterion, {}
    check = g._queue_stop_checker(prompt_ids)
    for split in (0, 5):       # the second pass finds most windows in the memo of the first
        got = []
        for i, n in enumerate(news):
            a = min(split, len(n))
            early = check([(i, n[:a], 0)])[0] if a else None
            got.append(early if early is not None else check([(i, n, a)])[0])
        assert got == want
    # Every row in one request: each window is asked once, also when every row comes twice; with the memo
    # full, no window is asked again.
    calls = []

    def counted(ids, scores):
        calls.append(tuple(ids.shape))
        return criterion(ids, scores)

    width = criterion.maximum_token_len
    counted.maximum_token_len = width
    g._stop_criterion = counted
    asked = []
    for rows, memo in ((list(enumerate(news)), {}), (list(enumerate(news)) * 2, {}), (list(enumerate(news)), None)):
        g._stop_memo = memo if memo is not None else g._stop_memo
        calls[:] = []
        assert g._queue_stop_checker(prompt_ids)([(i, n, 0) for i, n in rows]) == want * (len(rows) // len(news))
        asked.append(sum(r for r, c in calls if c == width))
    assert asked[0] == asked[1] > 0 and asked[2] == 0
    g._stop_criterion = criterion
    length = max(len(p) + len(n) for p, n in zip(prompt_ids, news))
    out = torch.zeros((len(news), length), dtype=torch.long)
    for r, (p, n) in enumerate(zip(prompt_ids, news)):
        out[r, length - len(p) - len(n):] = torch.tensor(p + n)
    for first_end in (1, 2, length - 30):
        every = torch.stack([criterion(out[:, :e], None).bool() for e in range(first_end, length + 1)], dim=1)
        assert torch.equal(stop_hits(criterion, out, first_end, length), every)
    steps = stop_candidates(criterion)
    candidates = sum(len(steps(n, 0, p[-1])) for p, n in zip(prompt_ids[:40], news[:40]))
    assert candidates < 0.5 * sum(len(n) for n in news[:40])


def test_stop_matcher_equals_the_criterion_on_every_window():
    """The table walk gives the criterion's answer on real code ended by stop strings, every suffix and prefix of
    it, random ids (some beyond the vocabulary) and stop-string fragments, for the embedded tokenizer and for a
    criterion with other stop strings (overlapping ones, one longer than any token)."""
    import random
    from importlib.resources import files

    from transformers import AutoTokenizer, StopStringCriteria

    from pva_sae.data import mbpp
    from pva_sae.model.generation import stop_criterion, stop_matcher

    tok = AutoTokenizer.from_pretrained(str(files("pva_sae") / "assets" / "default" / "model"))
    rng = random.Random(1)
    tails = ["\n\nassert f(1) == 2\n", "\nprint(x)\n", "\nif __name__ == '__main__':\n", "\n# end\n", "x  \n\n",
             "\nclass A:", "\ndef g(", "abab\nab\n\n\n"]
    texts = [t.code + rng.choice(tails) for t in mbpp.load_tasks("packaged")[:60]]
    for criterion in (stop_criterion(tok, tuple(GenerationConfig().stop_strings)),
                      StopStringCriteria(tok, ["ab\nab", "b\n", "\n\n\n", "assert f(", "__main__':"])):
        matches = stop_matcher(criterion)
        fragments = [i for s in criterion.stop_strings for i in tok(s, add_special_tokens=False)["input_ids"]]
        rows = []
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            rows += [ids[:end] for end in range(1, len(ids) + 1)]
        rows += [[rng.choice([rng.randrange(len(tok) + 5), *fragments]) for _ in range(rng.randrange(1, 30))]
                 for _ in range(3000)]
        want = [bool(criterion(torch.tensor([r]), None)[0]) for r in rows]
        assert 50 < sum(want) < len(rows) - 50
        assert [matches(r) for r in rows] == want
        assert matches([]) is False


def test_decode_ids_equals_the_tokenizers_decode_and_falls_back_where_the_library_would_differ(tiny_loaded):
    import copy
    import random

    from pva_sae.model.generation import _direct_decoder, decode_ids

    tok = tiny_loaded.tokenizer
    assert _direct_decoder(tok) is not None          # the embedded default's fast tokenizer takes the direct path
    rng = random.Random(3)
    rows = [[rng.randrange(len(tok)) for _ in range(rng.randrange(0, 300))] for _ in range(300)]
    rows += [list(tok.all_special_ids) + r[:10] for r in rows[:20]]
    assert [decode_ids(tok, r) for r in rows] == [tok.decode(r, skip_special_tokens=True) for r in rows]
    cleaned = copy.deepcopy(tok)
    cleaned.clean_up_tokenization_spaces = True      # the library cleans up after the backend: no direct path
    assert _direct_decoder(cleaned) is None

    class Custom(type(tok)):
        def _decode(self, token_ids, **kwargs):
            return "custom"

    custom = copy.deepcopy(tok)
    custom.__class__ = Custom
    assert _direct_decoder(custom) is None and decode_ids(custom, rows[0]) == "custom"
