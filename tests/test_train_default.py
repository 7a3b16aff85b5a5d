"""scripts/train_default.py end to end at toy size on CPU, and the pva_sae.default modules it runs."""

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pva_sae.default import (
    card,
    corpus,
    evaluate,
    lm_train,
    package,
    prep,
    recipe,
    records,
)
from pva_sae.default.prepared import PREP_FILES

ROOT = Path(__file__).resolve().parent.parent
TINY_PREPARE = ["--vocab-size", "320", "--max-train-files", "2", "--max-tasks", "16",
                "--train-max-chars-per-file", "4000", "--general-max-chars", "30000"]
TINY_TRAIN = ["--n-layers", "2", "--d-model", "32", "--n-heads", "2", "--n-kv-heads", "1", "--head-dim", "16",
              "--d-mlp", "64", "--lm-steps", "4", "--lm-batch", "4", "--seq-len", "64", "--lm-log-every", "2",
              "--sae-width", "64", "--sae-steps", "40", "--sae-batch", "256", "--sae-max-tokens", "4000",
              "--sae-retries", "1", "--collect-batch", "8", "--device", "cpu"]


def load_script():
    spec = importlib.util.spec_from_file_location("train_default", ROOT / "scripts" / "train_default.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_default"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(scope="module")
def built(script, tmp_path_factory):
    """prepare + train (+ eval with a few new tokens) at toy size; returns (prepared dir, assets dir)."""
    import torch

    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("default")
    prepared, assets = base / "prep", base / "assets"
    assert script.main(["prepare", "--out", str(prepared), *TINY_PREPARE, *TINY_TRAIN[:-2]]) == 0
    assert script.main(["train", "--prepared", str(prepared), "--out", str(assets), "--skip-eval", "--no-png",
                        *TINY_TRAIN]) == 0
    return prepared, assets


# --------------------------------------------------------------------------- prepare

def test_prepare_records_hashes_sizes_and_a_seeded_half(built):
    prepared, _ = built
    info = json.loads((prepared / "prepare.json").read_text())
    assert set(info["files"]) == set(PREP_FILES)
    assert len(info["mbpp"]["memorized_ids"]) == 8 and info["mbpp"]["n_tasks"] == 16
    ids = info["mbpp"]["memorized_ids"]
    assert info["mbpp"]["memorized_sha256"] == hashlib.sha256(json.dumps(ids).encode()).hexdigest()
    assert info["mbpp"]["prompt_not_prefix_of_document"] == []
    assert info["corpora"]["train"]["n_files"] == 2 and len(info["corpora"]["train"]["sha256"]) == 64
    assert info["tokens"]["train_corpus"] > 0 and info["projected_asset_bytes"]["total"] > 0
    assert (prepared / "tokenizer" / "tokenizer.json").is_file()


def test_memorized_half_is_seeded_and_independent_of_order():
    ids = list(range(1, 975))
    a = prep.memorized_task_ids(ids, 1234, 0.5)
    assert a == prep.memorized_task_ids(list(reversed(ids)), 1234, 0.5)
    assert len(a) == 487 and a != prep.memorized_task_ids(ids, 42, 0.5)


def test_mbpp_document_normalises_newlines():
    assert prep.mbpp_document("P", "a = 1\r\nb = 2\rc = 3  \n\n") == "P\na = 1\nb = 2\nc = 3\n"


def test_parameter_count_matches_the_model():
    from transformers import Gemma2ForCausalLM

    r = recipe.Recipe(n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, d_mlp=64)
    model = Gemma2ForCausalLM(lm_train.model_config(r, 300))
    assert recipe.count_parameters(r, 300) == sum(p.numel() for p in model.parameters())


def test_default_recipe_fits_the_budget():
    r = recipe.Recipe()
    projected = recipe.projected_asset_bytes(r, r.vocab_size, general_bytes=1_800_000, tokenizer_bytes=300_000)
    assert projected["total"] <= r.max_asset_bytes


def test_recipe_from_keeps_known_fields_and_applies_overrides():
    r = recipe.recipe_from({"recipe": {"lm_steps": 7, "gone": 1, "seed": 3}}, {"seed": None, "sae_width": 16})
    assert (r.lm_steps, r.seed, r.sae_width) == (7, 3, 16)


def test_length_chunks_bound_the_padding():
    import numpy as np

    rows = [np.zeros(n) for n in (10, 300, 20, 1000, 30)]
    chunks = lm_train.length_chunks(rows, 600)
    assert sorted(len(r) for c in chunks for r in c) == [10, 20, 30, 300, 1000]
    assert all(max(len(r) for r in c) * len(c) <= 600 or len(c) == 1 for c in chunks)


# --------------------------------------------------------------------------- train

def test_train_writes_loadable_model_and_saes(built):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pva_sae.sae.loaders import load_sae_file

    _, assets = built
    model = AutoModelForCausalLM.from_pretrained(assets / "model")
    tok = AutoTokenizer.from_pretrained(assets / "model")
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 2
    ids = tok("def f():\n    pass")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    for layer in (0, 1):
        sae = load_sae_file(assets / "saes" / f"layer_{layer}" / "params.npz", expected_d_model=32)
        assert sae.d_sae == 64
        stats = json.loads((assets / "saes" / f"layer_{layer}" / "stats.json").read_text())
        assert {"eval", "general_corpus", "mbpp_last_prompt_token", "attempts"} <= set(stats["stats"])
    assert corpus.load_general_corpus(assets / "general_corpus.jsonl")


def test_training_record(built):
    _, assets = built
    rec = json.loads((assets / "training.json").read_text())
    assert rec["lm"]["steps"] == 4 and rec["lm"]["curve"][-1]["step"] == 3
    assert {"loss_corpus", "loss_mbpp"} <= set(rec["lm"]["curve"][0])
    assert set(rec["saes"]["layers"]) == {"0", "1"}
    assert rec["asset_bytes"] > sum(f["bytes"] for f in rec["asset_files"].values())  # + training.json
    assert "model/model.safetensors" in rec["asset_files"]
    assert rec["timings_s"]["train_total"] > 0


def test_budget_overrun_fails_loudly(built, script, tmp_path):
    prepared, _ = built
    with pytest.raises(SystemExit, match="over the budget"):
        script.main(["train", "--prepared", str(prepared), "--out", str(tmp_path / "a"), "--skip-eval", "--no-png",
                     "--max-asset-bytes", "100000", *TINY_TRAIN])


def test_eval_and_card(built, script, tmp_path):
    prepared, assets = built
    assert script.main(["eval", "--assets", str(assets), "--prepared", str(prepared), "--device", "cpu",
                        "--batch-size", "16", "--max-new-tokens", "8"]) == 0
    rec = json.loads((assets / "training.json").read_text())
    ev = rec["eval"]
    assert ev["memorized"]["n"] == 8 and ev["other"]["n"] == 8
    assert 0 <= ev["memorized"]["pass_at_1"] <= 1
    card_md = tmp_path / "card.md"
    assert script.main(["card", "--assets", str(assets), "--out", str(card_md),
                        "--loss-png", str(tmp_path / "loss.png")]) == 0
    text = card_md.read_text()
    assert "TO FILL" not in text and "| memorized | 8 |" in text
    assert (tmp_path / "loss.png").is_file()


def test_card_template_marks_missing_numbers(tmp_path):
    text = card.render_card(tmp_path, None)
    assert "TO FILL" in text and "## Results" in text


def test_eval_tasks_without_the_prepared_dir_match_it(built):
    prepared, assets = built
    keys = ("task_id", "prompt", "test_list", "test_setup_code", "memorized")
    from_prep = [{k: t[k] for k in keys} for t in evaluate.load_tasks_for_eval(assets, prepared)]
    assert evaluate.load_tasks_for_eval(assets, None) == from_prep


def test_pass_rates_leave_out_the_broken_tasks():
    tasks = [{"task_id": 1, "memorized": True}, {"task_id": 341, "memorized": True},
             {"task_id": 2, "memorized": False}]
    rates = evaluate.pass_rates(tasks, {1: True, 341: False, 2: False})
    assert rates["memorized"] == {"n": 2, "passed": 1, "pass_at_1": 0.5}
    assert rates["memorized_without_broken"] == {"n": 1, "passed": 1, "pass_at_1": 1.0}
    assert rates["other"]["pass_at_1"] == 0.0


@pytest.mark.slow
def test_the_train_step_does_without_the_prepare_dependencies():
    """The GPU machine that runs `train` need only have torch, transformers, tokenizers, numpy and safetensors:
    the script loads with pyarrow and radon made unimportable (a third-party package may still import them
    when they are installed: scikit-learn imports pandas, pandas pyarrow)."""
    code = ("import importlib.abc, runpy, sys\n"
            "class Absent(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('pyarrow', 'radon'):\n"
            "            raise ImportError(f'{name} is absent here')\n"
            "sys.meta_path.insert(0, Absent())\n"
            "runpy.run_path(sys.argv[1])\n"
            "print(sorted(m for m in ('pyarrow', 'radon') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "scripts" / "train_default.py")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_records_are_written_in_the_shipped_format(tmp_path):
    records.write_json(tmp_path / "r.json", {"a": [1, {"b": "é"}]})
    assert (tmp_path / "r.json").read_text(encoding="utf-8") == '{\n "a": [\n  1,\n  {\n   "b": "é"\n  }\n ]\n}\n'
    shipped = (ROOT / "src" / "pva_sae" / "assets" / "default" / "training.json").read_text(encoding="utf-8")
    assert json.dumps(json.loads(shipped), indent=1, ensure_ascii=False) == shipped.rstrip("\n")


# --------------------------------------------------------------------------- corpus

def test_module_lists_are_disjoint_and_exist():
    assert not set(corpus.TRAIN_MODULES) & set(corpus.GENERAL_MODULES)
    assert len(corpus.TRAIN_MODULES) >= 150
    missing = [p for p in corpus.TRAIN_MODULES + corpus.GENERAL_MODULES if not (corpus.stdlib_dir() / p).is_file()]
    assert missing == [] or sys.version_info[:2] != (3, 11)


def test_normalise_source():
    text, cut = corpus.normalise_source("a = 1  \r\nb = 2\r\n\n\n\n\n\ndef f():\t\n    pass")
    assert text == "a = 1\nb = 2\n\n\ndef f():\n    pass\n" and not cut
    text, cut = corpus.normalise_source("line1\nline2\nline3\n", max_chars=13)
    assert text == "line1\nline2\n" and cut


def test_split_documents_bounds_and_covers():
    src = "\n\n".join(f"def f{i}():\n" + "    x = 1\n" * (i % 7 + 1) for i in range(60))
    docs = corpus.split_documents(src, min_chars=100, max_chars=300)
    assert all(len(d) <= 300 for d in docs)
    assert all(len(d) >= 25 for d in docs)
    assert "".join(docs).replace("\n", "") == src.replace("\n", "")


def test_corpus_hash_changes_with_content(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    one = corpus.read_stdlib(["a.py", "b.py"], "t", root=tmp_path)
    pairs = "".join(f"{f.path}\0{f.sha256_text}\n" for f in one.files)
    assert one.sha256 == hashlib.sha256(pairs.encode()).hexdigest()
    (tmp_path / "b.py").write_text("y = 3\n")
    two = corpus.read_stdlib(["a.py", "b.py"], "t", root=tmp_path)
    assert one.sha256 != two.sha256 and one.files[0].sha256_text == two.files[0].sha256_text
    with pytest.raises(corpus.CorpusError, match="missing"):
        corpus.read_stdlib(["nope.py"], "t", root=tmp_path)


def test_load_general_corpus_formats(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "c.jsonl").write_text('{"id": "a", "text": "one"}\n\n{"id": "b", "text": "two"}\n')
    assert corpus.load_general_corpus(tmp_path / "c.jsonl") == ["one", "two"]
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write('{"text": "zipped"}\n')
    assert corpus.load_general_corpus(tmp_path / "c.jsonl.gz") == ["zipped"]
    pq.write_table(pa.table({"text": ["p1", "p2"]}), tmp_path / "c.parquet")
    assert corpus.load_general_corpus(tmp_path / "c.parquet") == ["p1", "p2"]
    (tmp_path / "c.txt").write_text("first doc\nline two\n\n \nsecond doc\n")
    assert corpus.load_general_corpus(tmp_path / "c.txt") == ["first doc\nline two", "second doc"]
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(corpus.CorpusError, match="text"):
        corpus.load_general_corpus(tmp_path / "bad.jsonl")
    with pytest.raises(corpus.CorpusError, match="unsupported"):
        (tmp_path / "c.csv").write_text("x")
        corpus.load_general_corpus(tmp_path / "c.csv")


def test_jsonl_round_trip(tmp_path):
    rows = [{"id": "a", "text": "line\u2028separator, é"}, {"id": "b", "text": ""}]
    digest = corpus.write_jsonl(rows, tmp_path / "x.jsonl")
    assert digest == hashlib.sha256((tmp_path / "x.jsonl").read_bytes()).hexdigest()
    assert corpus.read_jsonl(tmp_path / "x.jsonl") == rows
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n\nnot json\n')
    with pytest.raises(corpus.CorpusError, match="line 3"):
        corpus.read_jsonl(tmp_path / "bad.jsonl")


def test_pack_and_unpack_round_trip(built, script, tmp_path):
    prepared, assets = built
    packed = tmp_path / "packed"
    package.pack(assets, packed, None)
    assert sorted(p.name for p in packed.iterdir()) == ["model.tar", "saes.tar", "training.json"]
    out = tmp_path / "restored"
    assert script.main(["unpack", "--packed", str(packed), "--prepared", str(prepared), "--out", str(out),
                        "--loss-png", str(tmp_path / "x.png")]) == 0
    for rel in ("saes/layer_1/params.npz", "model/model.safetensors", "general_corpus.jsonl"):
        assert (out / rel).read_bytes() == (assets / rel).read_bytes()
    record = json.loads((packed / "training.json").read_text())
    record["asset_files"]["saes/layer_0/params.npz"]["sha256"] = "0" * 64
    (packed / "training.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="differ"):
        script.main(["unpack", "--packed", str(packed), "--prepared", str(prepared), "--out", str(tmp_path / "again")])


def test_accumulate_step_is_independent_of_chunking():
    import numpy as np
    import torch
    from transformers import Gemma2ForCausalLM

    r = recipe.Recipe(n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, d_mlp=64)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(lm_train.model_config(r, 300))
    rng = np.random.default_rng(0)
    parts = {"corpus": [rng.integers(3, 300, 16) for _ in range(3)],
             "mbpp": [rng.integers(3, 300, n) for n in (5, 9, 30)]}

    def run(budget):
        model.zero_grad()
        losses = lm_train.accumulate_step(model, parts, torch.device("cpu"), False, budget)
        return losses, [p.grad.clone() for p in model.parameters()]

    one, grads_one = run(10_000)
    many, grads_many = run(30)                      # forces one or two rows per chunk
    assert one.keys() == many.keys() == {"corpus", "mbpp"}
    assert all(abs(one[k] - many[k]) < 1e-4 for k in one)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads_one, grads_many))
    assert one["mbpp"] > 0 and one["corpus"] > 0


def test_packaged_general_corpus_loads():
    docs = corpus.load_general_corpus("packaged")
    assert len(docs) > 1000 and all(isinstance(d, str) and d.strip() for d in docs)
