"""The tiny-model builder: tokenizer contract, save/load round trip, determinism."""

import hashlib

import pytest

from pva_sae.default.tiny import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    build_bpe_tokenizer,
    make_tiny_model,
    mbpp_texts,
)

CODE = "def add(a, b):\n    return a + b  # sum, é ✓\n\tx = '\\r'\n"


@pytest.fixture(scope="module")
def tokenizer():
    return build_bpe_tokenizer(mbpp_texts(), vocab_size=400)


def test_special_token_ids(tokenizer):
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [PAD_ID, EOS_ID, BOS_ID]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (PAD_ID, EOS_ID, BOS_ID)


def test_exactly_one_bos_and_no_eos(tokenizer):
    ids = tokenizer(CODE)["input_ids"]
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1 and EOS_ID not in ids
    assert BOS_ID not in tokenizer(CODE, add_special_tokens=False)["input_ids"]


def test_byte_level_round_trip(tokenizer):
    ids = tokenizer(CODE)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == CODE


def test_vocab_too_small_is_refused():
    with pytest.raises(ValueError, match="at least 259"):
        build_bpe_tokenizer(["abc"], vocab_size=100)


def test_saved_model_loads_with_auto_classes(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "gemma2"
    assert model.config.vocab_size == len(tok)
    assert tok(CODE)["input_ids"].count(BOS_ID) == 1
    assert tok.decode(tok(CODE)["input_ids"], skip_special_tokens=True) == CODE


def _digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_deterministic_for_a_seed(tmp_path):
    texts = list(mbpp_texts())[:200]
    a = make_tiny_model(tmp_path / "a", texts=texts, seed=1, vocab_size=300, n_layers=1)
    b = make_tiny_model(tmp_path / "b", texts=texts, seed=1, vocab_size=300, n_layers=1)
    c = make_tiny_model(tmp_path / "c", texts=texts, seed=2, vocab_size=300, n_layers=1)
    assert _digest(a) == _digest(b)
    assert _digest(a)["model.safetensors"] != _digest(c)["model.safetensors"]
    assert _digest(a)["tokenizer.json"] == _digest(c)["tokenizer.json"]
