"""HumanEval tasks: loading, the prompt's parts, and the harness pieces that label a program.

HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", MIT) ships with
pva-sae in ``assets/humaneval/``; a local file in the same format (``.jsonl`` or ``.jsonl.gz``) or the
Hugging Face hub copy can be used instead. Every row has ``task_id`` ("HumanEval/N"), ``prompt``
(imports, helper functions and the signature plus docstring of ``entry_point``),
``canonical_solution`` (the body), ``test`` (a ``check(candidate)`` function) and ``entry_point``.

A task becomes a :class:`HumanEvalTask` with the fields the pipeline reads from an MBPP task, so the
splits, prompts and stages treat both alike:

- ``task_id`` is N, ``name`` the original "HumanEval/N";
- ``text`` is the entry point's docstring without its examples (the problem description), followed
  by the source of the prompt's helper functions when it has any (``poly``, ``encode_cyclic``: the
  description names them, and ``check`` calls some of them);
- ``test_list`` holds up to :data:`EXAMPLES_PER_PROMPT` of the docstring's examples written as
  ``assert`` statements (``>>> f(x)`` followed by its value, or ``f(x) == / => / ➞ / returns y``);
  a docstring without usable examples gives the first asserts of ``check`` instead, with
  ``candidate`` renamed to the entry point (``example_source`` says which; two tasks, 38 and 50,
  have neither and their prompts show no assert). Three docstrings hold a wrong example (tasks 47,
  116, 148): they are shown as they are, as HumanEval's own prompt shows them;
- ``code`` is prompt + canonical solution; ``complexity`` is the cyclomatic complexity of the entry
  point's function in it, bucketed as for MBPP.

Labels come from HumanEval's own ``check``: the sandbox runs the prompt's imports and helper
functions (``context``), then the program, then the whole ``test`` source followed by
``check(<entry_point>)`` as the one test, so an assert failing inside ``check`` is a failed test.
"""

from __future__ import annotations

import ast
import builtins
import gzip
import hashlib
import inspect
import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from radon.complexity import cc_visit

from pva_sae.data.mbpp import DataError, difficulty_bucket
from pva_sae.data.text import is_single_assert, parse_quietly, unix_newlines

HUB_DATASET = "openai/openai_humaneval"
N_TASKS = 164
EXAMPLES_PER_PROMPT = 3
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
_NAME = re.compile(r"^HumanEval/(\d+)$")
# "f(x) == y", "f(x) ==> y", "f(x) => y", "f(x) -> y", "f(x) ➞ y", "f(x) returns y", "f(x) should return y."
_ARROW = re.compile(r"^\s*(?:[*-]\s*)?(?:for\s+)?(?P<call>.+?)\s*(?:==>|=>|->|➞|==|\bshould return\b|\breturns\b)\s*"
                    r"(?P<value>.+?)\s*\.?\s*$")
_HEADER = re.compile(r"^\s*(?:for\s+)?(?:examples?|examble)(?:\s+\d+)?\s*:?\s*$", re.IGNORECASE)
_MAX_LISTED = 20
_BUILTINS = set(dir(builtins))


@dataclass(frozen=True)
class HumanEvalTask:
    """One HumanEval problem, with the MBPP task's fields (see the module docstring) and its own."""

    task_id: int
    name: str
    text: str
    code: str
    test_list: tuple[str, ...]
    test_setup_code: str
    challenge_test_list: tuple[str, ...]
    complexity: int
    difficulty: str
    prompt: str
    entry_point: str
    canonical_solution: str
    test: str
    context: str
    example_source: str  # 'docstring', 'check', or 'none' (no example anywhere: the prompt shows no assert)


# --------------------------------------------------------------------------- loading

def packaged_file():
    """The packaged HumanEval copy (an importlib.resources Traversable)."""
    return resources.files("pva_sae") / "assets" / "humaneval" / "HumanEval.jsonl.gz"


def load_tasks(source: str = "packaged") -> list[HumanEvalTask]:
    """All tasks of ``source`` ('packaged', 'hub' or a .jsonl / .jsonl.gz path), sorted by task_id."""
    rows = _hub_rows() if source == "hub" else _jsonl_rows(_source_bytes(source), source)
    if not rows:
        raise DataError(f"dataset {source!r} holds no HumanEval task; point data.source at a HumanEval file")
    validate_rows(rows)
    return sorted((to_task(row) for row in rows), key=lambda t: t.task_id)


def dataset_sha256(source: str) -> str:
    """sha256 of the source file's bytes (compressed, as shipped); for 'hub', of the rows as canonical JSON."""
    if source == "hub":
        rows = sorted(_hub_rows(), key=lambda r: r["task_id"])
        blob = json.dumps(rows, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(blob.encode("ascii")).hexdigest()
    return hashlib.sha256(_source_bytes(source)).hexdigest()


def _source_bytes(source: str) -> bytes:
    if source == "packaged":
        return packaged_file().read_bytes()
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist; set data.source to 'packaged', 'hub' or the path of "
                        "a HumanEval-format .jsonl / .jsonl.gz file")
    return path.read_bytes()


def _jsonl_rows(blob: bytes, source: str) -> list[Any]:
    if blob[:2] == b"\x1f\x8b":
        blob = gzip.decompress(blob)
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"dataset file {source} is not UTF-8 text: {exc}") from None
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"dataset file {source}, line {number}: not valid JSON ({exc.msg}); fix or remove "
                            "that line") from None
    return rows


def _hub_rows() -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError("data.source='hub' needs the `datasets` package: pip install 'pva-sae[hub]' (or use "
                        "data.source='packaged', the same data shipped with pva-sae)") from None
    try:
        splits = datasets.load_dataset(HUB_DATASET)
    except Exception as exc:  # noqa: BLE001 - offline and hub failures surface as many unrelated types
        raise DataError(f"could not load {HUB_DATASET} from the Hugging Face hub: {type(exc).__name__}: {exc}. "
                        "Check the network, or use data.source='packaged'.") from None
    return [dict(row) for split in splits.values() for row in split]


# --------------------------------------------------------------------------- validation

def validate_rows(rows: Sequence[Any]) -> None:
    """Raise DataError naming every bad row: not an object, a missing or non-string field, a task_id not
    of the form 'HumanEval/N' or repeated, a prompt without the entry point's function, a prompt plus
    canonical solution that does not parse, a test without ``def check``."""
    problems, seen = [], set()
    for position, row in enumerate(rows):
        errors = _row_problems(row, seen)
        name = row.get("task_id") if isinstance(row, dict) and isinstance(row.get("task_id"), str) else None
        if errors:
            problems.append(f"{name or f'row {position}'}: {'; '.join(errors)}")
        if name:
            seen.add(name)
    if problems:
        listed = " | ".join(problems[:_MAX_LISTED])
        more = f" | ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise DataError(f"{len(problems)} malformed HumanEval row(s): {listed}{more}. Fix these rows or use "
                        "data.source='packaged'.")


def _row_problems(row: Any, seen: set[str]) -> list[str]:
    if not isinstance(row, dict):
        return [f"not an object but a {type(row).__name__}"]
    errors = [f"missing {f}" if f not in row else f"{f} is {type(row[f]).__name__}, expected str"
              for f in FIELDS if not isinstance(row.get(f), str)]
    if errors:
        return errors
    if not _NAME.match(row["task_id"]):
        errors.append("task_id is not of the form 'HumanEval/N'")
    if row["task_id"] in seen:
        errors.append("duplicate task_id")
    tree = parse_quietly(unix_newlines(row["prompt"] + row["canonical_solution"]))
    if tree is None:
        errors.append("prompt + canonical_solution does not parse")
    elif _entry_function(tree, row["entry_point"]) is None:
        errors.append(f"the prompt defines no function {row['entry_point']!r}")
    test = parse_quietly(unix_newlines(row["test"]))
    if test is None or _entry_function(test, "check") is None:
        errors.append("test does not define check(candidate)")
    return errors


def _entry_function(tree: ast.Module, name: str) -> ast.FunctionDef | None:
    return next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name), None)


# --------------------------------------------------------------------------- one task

def to_task(row: dict[str, Any]) -> HumanEvalTask:
    prompt, entry = unix_newlines(row["prompt"]), row["entry_point"]
    code = prompt + unix_newlines(row["canonical_solution"])
    test = unix_newlines(row["test"])
    docstring = function_docstring(_entry_function(ast.parse(code), entry))
    examples, source = docstring_examples(docstring, entry), "docstring"
    if not examples:
        examples, source = check_asserts(test, entry), "check"
    context = prompt_context(prompt, entry)
    helpers = helper_functions(context)
    text = description(docstring, entry) + (f"\n\n{helpers}" if helpers else "")
    complexity = function_complexity(code, entry)
    return HumanEvalTask(task_id=int(_NAME.match(row["task_id"]).group(1)), name=row["task_id"],
                         text=text, code=code, test_list=tuple(examples[:EXAMPLES_PER_PROMPT]),
                         test_setup_code="", challenge_test_list=(), complexity=complexity,
                         difficulty=difficulty_bucket(complexity), prompt=prompt, entry_point=entry,
                         canonical_solution=unix_newlines(row["canonical_solution"]), test=test,
                         context=context, example_source=source if examples else "none")


def function_docstring(fn: ast.FunctionDef) -> str:
    """The function's docstring, or its first string statement (task 115 imports ``math`` before it)."""
    first = next((n.value for n in fn.body if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
                  and isinstance(n.value.value, str)), None)
    return ast.get_docstring(fn) or (inspect.cleandoc(first.value) if first is not None else "")


def function_complexity(code: str, entry_point: str) -> int:
    """Cyclomatic complexity (radon) of the entry point's function; 1 if radon finds no such block."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        blocks = cc_visit(code)
    return next((b.complexity for b in blocks if b.name == entry_point), 1)


def prompt_context(prompt: str, entry_point: str) -> str:
    """The prompt's source without the entry point's function: its imports and helper functions."""
    tree = ast.parse(prompt + "    pass\n")
    lines = prompt.split("\n")
    fn = _entry_function(tree, entry_point)
    start = min([fn.lineno] + [d.lineno for d in fn.decorator_list]) - 1
    kept = lines[:start] + lines[fn.end_lineno:]
    return "\n".join(kept).strip() + "\n" if any(line.strip() for line in kept) else ""


def helper_functions(context: str) -> str:
    """The function definitions of the prompt's context (``poly``, ``encode_cyclic``...), as source."""
    tree = ast.parse(context)
    return "\n\n\n".join(ast.get_source_segment(context, n) for n in tree.body
                            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))


# --------------------------------------------------------------------------- the prompt's parts

def description(docstring: str, entry_point: str) -> str:
    """The docstring up to its first example (a ``>>>`` line, an example of the entry point, or an
    "Example(s):" header), stripped."""
    lines = docstring.split("\n")
    end = len(lines)
    for i, line in enumerate(lines):
        if line.strip().startswith(">>>") or _HEADER.match(line) or _example_line(line, entry_point):
            end = i
            break
    text = "\n".join(lines[:end]).strip()
    return text or docstring.strip()


def docstring_examples(docstring: str, entry_point: str) -> list[str]:
    """The docstring's examples of ``entry_point`` as single ``assert`` statements, in order."""
    out = []
    lines = docstring.split("\n")
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith(">>>"):
            call = stripped[3:].strip()
            want = next((w.strip() for w in lines[i + 1:i + 2] if w.strip() and not w.strip().startswith(">>>")), "")
            test = _as_assert(call, want, entry_point)
        else:
            test = _example_line(line, entry_point)
        if test and test not in out:
            out.append(test)
    return out


def _example_line(line: str, entry_point: str) -> str | None:
    """``f(x) <arrow> y`` on one line (after an optional ``for`` or bullet), as an assert; else None."""
    match = _ARROW.match(line)
    if not match or not match.group("call").startswith(entry_point + "("):
        return None
    value = re.split(r"\s+#", match.group("value"))[0]
    return _as_assert(match.group("call"), value, entry_point)


def _as_assert(call: str, want: str, entry_point: str) -> str | None:
    """``assert <call> == <want>`` (or ``assert <call>`` when the call already compares), if it parses and
    calls the entry point; None otherwise."""
    call = re.split(r"\s+#", call)[0].strip()
    if not _calls(call, entry_point):
        return None
    want = {"true": "True", "false": "False"}.get(want.strip(), want.strip())
    test = f"assert {call} == {want}" if want else f"assert {call}"
    return test if is_single_assert(test) and (want or _is_comparison(call)) else None


def _calls(expression: str, name: str) -> bool:
    """Whether ``expression`` is one expression that calls ``name`` and names nothing but it and builtins
    (``is_happy(a)`` in a docstring means the string 'a', and cannot be run)."""
    tree = parse_quietly(expression)
    if tree is None or len(tree.body) != 1 or not isinstance(tree.body[0], ast.Expr):
        return False
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    calls = any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == name for n in ast.walk(tree))
    return calls and names <= {name} | _BUILTINS


def _is_comparison(expression: str) -> bool:
    tree = parse_quietly(expression)
    return tree is not None and isinstance(tree.body[0].value, ast.Compare)


def check_asserts(test: str, entry_point: str) -> list[str]:
    """The top-level ``assert`` statements of ``check`` that call ``candidate``, with ``candidate``
    renamed to ``entry_point``: what a prompt shows when the docstring has no usable example."""
    fn = _entry_function(ast.parse(test), "check")
    out = []
    for node in fn.body:
        if not isinstance(node, ast.Assert):
            continue
        calls = [n for n in ast.walk(node.test) if isinstance(n, ast.Name) and n.id == "candidate"]
        if not calls:
            continue
        for name in calls:
            name.id = entry_point
        out.append(f"assert {ast.unparse(node.test)}")
    return out


# --------------------------------------------------------------------------- the harness

def check_tests(task: HumanEvalTask) -> tuple[str, ...]:
    """The one test the sandbox runs: HumanEval's ``test`` source, then ``check(<entry_point>)``."""
    return (f"{task.test.rstrip()}\n\n\ncheck({task.entry_point})\n",)


def program_to_run(task: HumanEvalTask, program: str) -> str:
    """What the sandbox executes before the test: the prompt's imports and helper functions (which
    ``check`` and the docstring may name), then the program, whose definitions take precedence."""
    return f"{task.context}\n\n{program}" if task.context else program


def signature_program(task: HumanEvalTask, completion: str) -> str:
    """The text a completion of HumanEval's own prompt continues: prompt + completion."""
    return task.prompt + unix_newlines(completion)
