"""HumanEval as a second benchmark: loading, prompts, labels from its own check function, splits, the build."""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import re

import numpy as np
import pytest

from pva_sae.config import ConfigError, SandboxConfig, resolve_config
from pva_sae.data import benchmarks, humaneval, mbpp
from pva_sae.data.prompts import PromptError, build_prompt
from pva_sae.data.text import is_single_assert
from pva_sae.execution.label import exec_job, program_of
from pva_sae.execution.sandbox import ExecJob, run_jobs

NEGATED = {ast.Lt: ast.GtE, ast.GtE: ast.Lt, ast.Gt: ast.LtE, ast.LtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq}
SANDBOX = SandboxConfig(timeout_s=10)


@pytest.fixture(scope="module")
def tasks():
    return humaneval.load_tasks()


def entry_function(tree: ast.Module, name: str) -> ast.FunctionDef:
    return next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)


def own_nodes(fn: ast.FunctionDef):
    """The nodes of ``fn``'s body, not descending into nested functions, lambdas or classes."""
    stack = list(fn.body)
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))


def mutant(task, kind: str) -> str | None:
    """The canonical program with one simple bug, or None when ``kind`` does not apply to it:
    'none' (the body is ``return None``), 'plus_one' (every returned value + 1), 'comparisons' (every
    comparison of the function's own body negated: < becomes >=, == becomes != ...)."""
    tree = ast.parse(task.code)
    fn = entry_function(tree, task.entry_point)
    changed = False
    if kind == "none":
        fn.body, changed = [ast.Return(ast.Constant(None))], True
    for node in own_nodes(fn) if kind != "none" else ():
        if kind == "plus_one" and isinstance(node, ast.Return) and node.value is not None:
            node.value, changed = ast.BinOp(node.value, ast.Add(), ast.Constant(1)), True
        if kind == "comparisons" and isinstance(node, ast.Compare) and any(type(o) in NEGATED for o in node.ops):
            node.ops, changed = [NEGATED.get(type(o), type(o))() for o in node.ops], True
    return ast.unparse(ast.fix_missing_locations(tree)) if changed else None


def run_programs(pairs):
    return run_jobs([exec_job(task.task_id, task, program) for task, program in pairs], SANDBOX)


# --------------------------------------------------------------------------- data

def test_the_packaged_copy_is_humaneval(tasks):
    assert [t.task_id for t in tasks] == list(range(humaneval.N_TASKS))
    assert all(t.name == f"HumanEval/{t.task_id}" for t in tasks)
    digest = hashlib.sha256(humaneval.packaged_file().read_bytes()).hexdigest()
    assert digest == humaneval.dataset_sha256("packaged") == benchmarks.dataset_sha256("humaneval")
    readme = (humaneval.packaged_file().parent / "README.md").read_text()
    assert digest in readme and "MIT" in (humaneval.packaged_file().parent / "LICENSE").read_text()
    assert tasks[0].entry_point == "has_close_elements" and tasks[0].context == "from typing import List\n"


def test_the_switch_selects_the_loader():
    assert len(benchmarks.load_tasks("mbpp")) == 974
    assert len(benchmarks.load_tasks("humaneval")) == 164
    with pytest.raises(mbpp.DataError, match="use one of mbpp, humaneval"):
        benchmarks.load_tasks("apps")


def test_a_local_file_loads_and_bad_rows_are_named(tmp_path, tasks):
    rows = [json.loads(line) for line in gzip.decompress(humaneval.packaged_file().read_bytes()).decode().splitlines()]
    path = tmp_path / "he.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:5]) + "\n")
    assert [t.task_id for t in humaneval.load_tasks(str(path))] == [0, 1, 2, 3, 4]
    bad = [dict(rows[0], task_id="Task/0"), {k: v for k, v in rows[1].items() if k != "test"},
           dict(rows[2], entry_point="nope"), dict(rows[3], test="assert True")]
    path.write_text("\n".join(json.dumps(r) for r in bad))
    with pytest.raises(mbpp.DataError) as err:
        humaneval.load_tasks(str(path))
    message = str(err.value)
    for part in ("4 malformed", "Task/0: task_id is not of the form", "HumanEval/1: missing test",
                 "HumanEval/2: the prompt defines no function 'nope'", "HumanEval/3: test does not define check"):
        assert part in message
    with pytest.raises(mbpp.DataError, match="does not exist"):
        humaneval.load_tasks(str(tmp_path / "missing.jsonl"))


def test_splits_are_stratified_as_for_mbpp(tasks):
    splits = mbpp.make_splits(tasks, (0.5, 0.1, 0.4), seed=42)
    assert [len(splits[s]) for s in mbpp.SPLIT_NAMES] == mbpp.split_sizes(164, (0.5, 0.1, 0.4)) == [83, 16, 65]
    assert sorted(i for ids in splits.values() for i in ids) == list(range(164))
    summary = mbpp.split_summary(tasks, splits)
    for name in mbpp.SPLIT_NAMES:  # every split looks like the whole in complexity
        assert abs(summary[name]["mean_complexity"] - summary["all"]["mean_complexity"]) < 0.6
        for bucket in mbpp.BUCKETS:
            assert abs(summary[name]["bucket_shares"][bucket] - summary["all"]["bucket_shares"][bucket]) < 0.1
    assert mbpp.make_splits(tasks, seed=42) == splits != mbpp.make_splits(tasks, seed=7)


def test_complexity_is_the_entry_points_own():
    code = ("def helper(x):\n    if x:\n        if x > 1:\n            return 2\n    return 1\n\n"
            "def f(x):\n    return x\n")
    assert humaneval.function_complexity(code, "f") == 1
    assert humaneval.function_complexity(code, "helper") == 3


# --------------------------------------------------------------------------- prompts

def test_prompt_of_task_0_is_description_examples_initiator(tasks):
    assert build_prompt(tasks[0]) == (
        "Check if in given list of numbers, are any two numbers closer to each other than\ngiven threshold.\n\n"
        "assert has_close_elements([1.0, 2.0, 3.0], 0.5) == False\n"
        "assert has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3) == True\n\n# Solution:")


def test_every_prompt_builds_with_runnable_examples(tasks):
    sources = {}
    for t in tasks:
        prompt = build_prompt(t)
        assert ">>>" not in t.text and t.text.strip() and prompt.endswith("# Solution:")
        assert 0 < len(t.test_list) <= humaneval.EXAMPLES_PER_PROMPT or t.example_source == "none"
        assert all(is_single_assert(x) and re.search(rf"\b{t.entry_point}\(", x) for x in t.test_list)
        assert "candidate" not in "".join(t.test_list)
        sources.setdefault(t.example_source, []).append(t.task_id)
    assert sources["none"] == [38, 50] and len(sources["check"]) > 10 and len(sources["docstring"]) > 100
    # the examples hold for the canonical solutions, except three docstrings that HumanEval got wrong
    shown = [t for t in tasks if t.test_list]
    results = run_jobs([ExecJob(key=t.task_id, program=humaneval.program_to_run(t, t.code), tests=t.test_list)
                        for t in shown], SANDBOX)
    assert [t.task_id for t, r in zip(shown, results) if not r.passed] == [47, 116, 148]


def test_examples_come_from_each_docstring_format():
    def examples(doc, name="f"):
        return humaneval.docstring_examples(doc, name)

    assert examples(">>> f(1)\n2\n>>> f('a')\n'b'") == ["assert f(1) == 2", "assert f('a') == 'b'"]
    assert examples("f([1]) ==> True\nf(2) ➞ false # no\n* f(3) => [3]") == [
        "assert f([1]) == True", "assert f(2) == False", "assert f(3) == [3]"]
    assert examples("for f(7, 34) == 34\nf(1) should return 16.\nf(2) returns 'x'") == [
        "assert f(7, 34) == 34", "assert f(1) == 16", "assert f(2) == 'x'"]
    assert examples(">>> f([1, 2]) == [2, 1]") == ["assert f([1, 2]) == [2, 1]"]
    assert examples("f(a) => False\ng(1) == 2\nInput: [1]\nOutput: 2\nf(1) -> 19 - 5 = 8") == []
    assert humaneval.description("Do it.\nNote: x.\n\nFor example:\n>>> f(1)\n2", "f") == "Do it.\nNote: x."
    assert humaneval.description("Do it.\nf(1) == 2\nmore", "f") == "Do it."


def test_check_fallback_renames_candidate(tasks):
    t = next(t for t in tasks if t.example_source == "check")
    assert t.test_list == tuple(humaneval.check_asserts(t.test, t.entry_point)[:3])
    assert humaneval.check_asserts("def check(candidate):\n    assert candidate(1) == 2\n    for i in range(3):\n"
                                   "        assert candidate(i)\n    assert True\n", "g") == ["assert g(1) == 2"]


def test_helpers_are_shown_and_an_empty_tests_section_is_explicit(tasks):
    t = tasks[38]
    assert "def encode_cyclic(s: str):" in t.text and t.test_list == ()
    assert build_prompt(t).endswith('return "".join(groups)\n\n\n\n# Solution:')
    with pytest.raises(PromptError, match="at least one test"):
        build_prompt(mbpp.Task(1, "x", "", (), "", (), 1, "easy"))


def test_signature_style_is_humanevals_own_prompt(tasks):
    assert build_prompt(tasks[2], style="signature") == tasks[2].prompt
    with pytest.raises(PromptError, match="needs data.dataset='humaneval'"):
        build_prompt(mbpp.load_tasks()[0], style="signature")
    with pytest.raises(PromptError, match="unknown"):
        build_prompt(tasks[2], style="chat")


def test_config_checks_the_benchmark_and_the_style():
    assert resolve_config(overrides=["data.dataset=humaneval", "prompt.style=signature"]).data.dataset == "humaneval"
    with pytest.raises(ConfigError, match="data.dataset must be one of mbpp, humaneval"):
        resolve_config(overrides=["data.dataset=apps"])
    with pytest.raises(ConfigError, match="set data.dataset=humaneval"):
        resolve_config(overrides=["prompt.style=signature"])


# --------------------------------------------------------------------------- labels from check

def test_canonical_solutions_pass_in_the_sandbox(tasks):
    results = run_programs([(t, t.code) for t in tasks])
    assert [t.name for t, r in zip(tasks, results) if not r.passed] == []


def mutant_statuses(tasks, kinds=("none", "plus_one", "comparisons")):
    pairs = [(kind, t, mutant(t, kind)) for kind in kinds for t in tasks]
    pairs = [p for p in pairs if p[2] is not None]
    results = run_programs([(t, program) for _, t, program in pairs])
    return [(kind, t.task_id, r) for (kind, t, _), r in zip(pairs, results)]


def test_simple_mutants_fail_on_a_sample(tasks):
    rng = np.random.default_rng(0)
    sample = [tasks[i] for i in sorted(rng.choice(len(tasks), size=16, replace=False))]
    outcomes = mutant_statuses(sample)
    assert {kind for kind, _, _ in outcomes} == {"none", "plus_one", "comparisons"}
    assert [(kind, tid) for kind, tid, r in outcomes if r.passed] == []
    # a wrong answer is a failed check, not a crash of the harness
    assert {r.status for kind, _, r in outcomes if kind == "comparisons"} <= {"failed", "error"}
    assert any(r.status == "failed" and "check(" in r.detail for _, _, r in outcomes)


@pytest.mark.slow
def test_simple_mutants_fail_on_every_task(tasks):
    outcomes = mutant_statuses(tasks)
    assert len(outcomes) > 400
    assert [(kind, tid) for kind, tid, r in outcomes if r.passed] == []
    int_valued = {t.task_id for t in tasks if ast.unparse(entry_function(ast.parse(t.code), t.entry_point).returns or
                                                           ast.Constant(None)) == "int"}
    assert {r.status for kind, tid, r in outcomes if kind == "plus_one" and tid in int_valued} == {"failed"}


def test_programs_of_both_prompt_styles_are_labelled(tasks):
    t = tasks[0]  # the model's program need not repeat the prompt's imports: they run first
    body = t.canonical_solution
    function = "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n" + body
    tests_cfg = resolve_config(overrides=["data.dataset=humaneval"])
    sig_cfg = resolve_config(overrides=["data.dataset=humaneval", "prompt.style=signature"])
    assert program_of(function + "\nprint(1)\n", t, tests_cfg) == function.rstrip()
    assert program_of(body + "\n\nassert x\n", t, sig_cfg) == (t.prompt + body).rstrip()
    wrong = body.replace("return True", "return False", 1)
    results = run_programs([(t, program_of(function, t, tests_cfg)), (t, program_of(body, t, sig_cfg)),
                            (t, program_of(wrong, t, sig_cfg)), (t, program_of("    return None\n", t, sig_cfg))])
    assert [r.status for r in results] == ["passed", "passed", "failed", "failed"]


# --------------------------------------------------------------------------- the build stage

def test_build_stage_on_humaneval_with_the_embedded_default(tmp_path):
    from pva_sae.rundir.atomic import read_json
    from pva_sae.rundir.paths import RunDir
    from pva_sae.stages.build import build_dataset

    ids = (0, 2, 38, 53, 163)
    for style in ("tests", "signature"):
        run_dir = tmp_path / style
        cfg = resolve_config(overrides=[f"output.run_dir={run_dir}", "data.dataset=humaneval", f"prompt.style={style}",
                                        f"data.task_ids={json.dumps(list(ids))}", "generation.max_new_tokens=48",
                                        "model.device=cpu", "model.torch_threads=1", "checkpoint.resume=never"])
        records = build_dataset(cfg, interactive=False, progress=False)
        run = RunDir.at(run_dir)
        tasks = {t.task_id: t for t in humaneval.load_tasks()}
        assert [r["task_id"] for r in records] == list(ids)
        assert all(r["prompt"] == build_prompt(tasks[r["task_id"]], style=style) for r in records)
        assert all(r["status"] in ("passed", "failed", "error", "timeout") for r in records)
        assert sorted(i for s in read_json(run.splits)["splits"].values() for i in s) == list(range(164))
        manifest = read_json(run.manifest)["dataset"]
        assert manifest["name"] == "humaneval" and manifest["sha256"] == humaneval.dataset_sha256("packaged")
        if style == "signature":
            assert all(r["program"].startswith(tasks[r["task_id"]].prompt.strip()[:20]) for r in records)
