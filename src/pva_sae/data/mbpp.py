"""MBPP tasks: loading, validation, difficulty and the stratified splits.

MBPP (Austin et al. 2021, "Program Synthesis with Large Language Models", CC BY 4.0) ships with
pva-sae in ``assets/mbpp/``; a local file in the same format or the Hugging Face hub copy can be used
instead. Difficulty is the cyclomatic complexity of the reference solution (radon ``cc_visit``, the
maximum over its blocks), bucketed easy = 1, medium = 2-3, hard >= 4.

The tasks are split into three disjoint sets, stratified by complexity and seeded: ``sae`` (where
latents are selected), ``tuning`` (hyperparameters) and ``validation`` (held-out evaluation).
``make_splits`` documents how sizes are rounded and how the stratification works.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import io
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from radon.complexity import cc_visit

from pva_sae.data.text import is_single_assert, unix_newlines
from pva_sae.errors import PvaSaeError

HUB_DATASET = "google-research-datasets/mbpp"
HUB_CONFIG = "full"
SPLIT_NAMES = ("sae", "tuning", "validation")
BUCKETS = ("easy", "medium", "hard")
TESTS_PER_TASK = 3

# Field -> accepted types. test_setup_code and challenge_test_list may be absent or null.
REQUIRED_FIELDS: dict[str, tuple[type, ...]] = {"task_id": (int,), "text": (str,), "code": (str,),
                                                "test_list": (list, tuple)}
OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {"test_setup_code": (str,), "challenge_test_list": (list, tuple)}
_MAX_LISTED = 20  # problems named in one DataError; the count of the rest follows


class DataError(PvaSaeError, ValueError):
    """The dataset cannot be used as it is; the message names the task ids and the fix."""


@dataclass(frozen=True)
class Task:
    """One MBPP task. ``code`` has ``\\n`` line endings; the other fields are as in the source."""

    task_id: int
    text: str
    code: str
    test_list: tuple[str, ...]
    test_setup_code: str
    challenge_test_list: tuple[str, ...]
    complexity: int
    difficulty: str


# --------------------------------------------------------------------------- loading

def load_tasks(source: str = "packaged") -> list[Task]:
    """All tasks of ``source`` ('packaged', 'hub' or a .jsonl/.json/.parquet path), sorted by task_id.

    Rows are validated first, so a malformed file fails here with every bad task named, not later
    in the middle of a generation run.
    """
    rows = _read_rows(source)
    if not rows:
        raise DataError(f"dataset {source!r} holds no tasks; point data.source at an MBPP file")
    validate_rows(rows)
    return sorted((_to_task(row) for row in rows), key=lambda t: t.task_id)


def dataset_sha256(source: str) -> str:
    """sha256 of the source file's bytes; for 'hub', of the rows as canonical JSON (sorted keys and ids).

    Recorded in run manifests so a result can be traced to the exact data it came from.
    """
    if source == "hub":
        rows = sorted(_hub_rows(), key=lambda r: r["task_id"])
        blob = json.dumps(rows, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(blob.encode("ascii")).hexdigest()
    return hashlib.sha256(_source_bytes(source)).hexdigest()


def packaged_file():
    """The packaged MBPP copy (an importlib.resources Traversable; works from wheels and zips)."""
    return resources.files("pva_sae") / "assets" / "mbpp" / "mbpp.jsonl"


def _source_bytes(source: str) -> bytes:
    if source == "packaged":
        return packaged_file().read_bytes()
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist; set data.source to 'packaged', 'hub' "
                        "or the path of an MBPP-format .jsonl / .json / .parquet file")
    return path.read_bytes()


def _read_rows(source: str) -> list[dict[str, Any]]:
    if source == "hub":
        return _hub_rows()
    suffix = ".jsonl" if source == "packaged" else Path(source).suffix.lower()
    if suffix not in (".jsonl", ".json", ".parquet"):
        raise DataError(f"dataset file {source}: unsupported extension {suffix!r}; use .jsonl, .json or .parquet")
    blob = _source_bytes(source)
    if suffix == ".parquet":
        return _parquet_rows(blob, source)
    try:
        text = blob.decode("utf-8")
        if suffix == ".jsonl":
            return _jsonl_rows(text, source)
        rows = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"dataset file {source} is not valid {suffix.lstrip('.')}: {exc}") from None
    if not isinstance(rows, list):
        raise DataError(f"dataset file {source} must hold a JSON array of task objects, "
                        f"not a {type(rows).__name__}")
    return rows


def _jsonl_rows(text: str, source: str) -> list[Any]:
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"dataset file {source}, line {number}: not valid JSON ({exc.msg} at column "
                            f"{exc.colno}); fix or remove that line") from None
    return rows


def _parquet_rows(blob: bytes, source: str) -> list[dict[str, Any]]:
    try:
        return pq.read_table(io.BytesIO(blob)).to_pylist()
    except pa.ArrowInvalid as exc:
        raise DataError(f"dataset file {source} is not valid parquet: {exc}") from None


def _hub_rows() -> list[dict[str, Any]]:
    """Every split of the hub copy (train/test/validation/prompt together hold the 974 tasks)."""
    try:
        import datasets
    except ImportError:
        raise DataError("data.source='hub' needs the `datasets` package: pip install 'pva-sae[hub]' "
                        "(or use data.source='packaged', the same data shipped with pva-sae)") from None
    try:
        splits = datasets.load_dataset(HUB_DATASET, HUB_CONFIG)
    except Exception as exc:  # offline and hub failures surface as many unrelated exception types
        raise DataError(f"could not load {HUB_DATASET} ({HUB_CONFIG}) from the Hugging Face hub: "
                        f"{type(exc).__name__}: {exc}. Check the network, or use data.source='packaged'.") from None
    return [dict(row) for split in splits.values() for row in split]


def _to_task(row: dict[str, Any]) -> Task:
    code = unix_newlines(row["code"])
    complexity = cyclomatic_complexity(code)
    return Task(task_id=row["task_id"], text=row["text"], code=code, test_list=tuple(row["test_list"]),
                test_setup_code=row.get("test_setup_code") or "",
                challenge_test_list=tuple(row.get("challenge_test_list") or ()),
                complexity=complexity, difficulty=difficulty_bucket(complexity))


# --------------------------------------------------------------------------- validation

def validate_rows(rows: Sequence[Any]) -> None:
    """Raise DataError naming every bad row by task_id (by position when the id itself is bad).

    Errors: a row that is not an object; a missing or mistyped field; a duplicate task_id; an empty
    description; a test_list that is not exactly three single ``assert`` statements; reference code
    that does not parse. Not errors: non-empty ``test_setup_code`` (tasks 367 and 927 need theirs),
    and reference solutions that fail their own tests at run time (three MBPP tasks do on current
    CPython, see ``assets/mbpp/README.md``): that is a property of the data, not a malformed file.
    """
    problems: list[str] = []
    seen: set[int] = set()
    for position, row in enumerate(rows):
        errors = _row_problems(row, seen)
        if errors:
            problems.append(f"{_row_name(row, position)}: {'; '.join(errors)}")
        if isinstance(row, dict) and _is_int(row.get("task_id")):
            seen.add(row["task_id"])
    if problems:
        listed = " | ".join(problems[:_MAX_LISTED])
        more = f" | ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise DataError(f"{len(problems)} malformed MBPP row(s): {listed}{more}. "
                        "Fix these rows or use data.source='packaged'.")


def _row_name(row: Any, position: int) -> str:
    if isinstance(row, dict) and _is_int(row.get("task_id")):
        return f"task_id {row['task_id']}"
    return f"row {position}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _row_problems(row: Any, seen: set[int]) -> list[str]:
    if not isinstance(row, dict):
        return [f"not an object but a {type(row).__name__}"]
    errors = _type_problems(row)
    if errors:
        return errors
    if row["task_id"] in seen:
        errors.append("duplicate task_id")
    if not row["text"].strip():
        errors.append("empty text")
    errors += _test_problems(row["test_list"])
    errors += _code_problems(row["code"])
    return errors


def _type_problems(row: dict[str, Any]) -> list[str]:
    errors = [f"missing {name}" for name in REQUIRED_FIELDS if name not in row]
    for name, types in {**REQUIRED_FIELDS, **OPTIONAL_FIELDS}.items():
        value = row.get(name)
        if value is None:
            if name in REQUIRED_FIELDS and name in row:
                errors.append(f"{name} is null")
            continue
        if not isinstance(value, types) or (name == "task_id" and not _is_int(value)):
            errors.append(f"{name} is {type(value).__name__}, expected {' or '.join(t.__name__ for t in types)}")
        elif isinstance(value, (list, tuple)) and not all(isinstance(v, str) for v in value):
            errors.append(f"{name} holds non-string entries")
    return errors


def _test_problems(tests: Sequence[str]) -> list[str]:
    if len(tests) != TESTS_PER_TASK:
        return [f"test_list has {len(tests)} entries, expected {TESTS_PER_TASK} assert statements"]
    return [f"test {i} is not a single assert statement: {test!r}"
            for i, test in enumerate(tests) if not is_single_assert(test)]


def _code_problems(code: str) -> list[str]:
    try:
        _parse_or_raise(unix_newlines(code))
    except SyntaxError as exc:
        return [f"reference code does not parse (line {exc.lineno}: {exc.msg})"]
    return []


def _parse_or_raise(source: str) -> ast.Module:
    """ast.parse without the invalid-escape warnings some MBPP references raise (e.g. '\\d')."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.parse(source)


# --------------------------------------------------------------------------- difficulty

@functools.lru_cache(maxsize=8192)
def cyclomatic_complexity(code: str) -> int:
    """Max cyclomatic complexity over the blocks radon finds (functions, methods, classes).

    Code with no block (module-level statements only) counts as 1, a single straight path. Remembered per
    code (a pure function of it): every stage and sub-build loads the tasks again.
    """

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        blocks = cc_visit(unix_newlines(code))
    return max((block.complexity for block in blocks), default=1)


def difficulty_bucket(complexity: int) -> str:
    """easy = 1, medium = 2-3, hard >= 4."""
    if complexity <= 1:
        return "easy"
    return "medium" if complexity <= 3 else "hard"


def select_range(tasks: Sequence[Task], start_idx: int, end_idx: int | None) -> list[Task]:
    """Tasks at positions start_idx..end_idx of ``tasks`` (0-based, inclusive; None = the last)."""
    last = len(tasks) - 1
    end = last if end_idx is None else end_idx
    if not 0 <= start_idx <= end <= last:
        raise DataError(f"task range start_idx={start_idx}, end_idx={end_idx} is outside the {len(tasks)} "
                        f"tasks (positions 0..{last}); set data.start_idx >= 0 and data.end_idx <= {last} "
                        "(or None for the last task)")
    return list(tasks[start_idx:end + 1])


def seeded_subset(ids: Sequence[int], max_n: int, seed: int) -> list[int]:
    """At most ``max_n`` of ``ids`` (0 = all), drawn without replacement with a seeded generator; sorted."""

    if max_n == 0 or max_n >= len(ids):
        return sorted(ids)
    return sorted(int(t) for t in np.random.default_rng(seed).choice(list(ids), size=max_n, replace=False))


def select_ids(tasks: Sequence[Task], task_ids: Sequence[int]) -> list[Task]:
    """The tasks whose ids are in ``task_ids`` (in the order of ``tasks``); unknown ids are an error."""
    wanted = set(task_ids)
    missing = sorted(wanted - {t.task_id for t in tasks})
    if missing:
        raise DataError(f"data.task_ids {missing[:10]}{' ...' if len(missing) > 10 else ''} are not in the selected "
                        "task range; check data.task_ids, data.start_idx and data.end_idx")
    if not wanted:
        raise DataError("data.task_ids is empty; use None for every task of the range")
    return [t for t in tasks if t.task_id in wanted]


# --------------------------------------------------------------------------- splits

def split_sizes(n: int, fractions: Sequence[float]) -> list[int]:
    """Split sizes for ``n`` tasks: every split gets floor(n * fraction), except the largest
    (the first among equals), which takes what is left. For 974 tasks and (0.5, 0.1, 0.4):
    tuning floor(97.4) = 97, validation floor(389.6) = 389, sae 974 - 97 - 389 = 488.
    """
    sizes = [math.floor(n * f + 1e-9) for f in fractions]
    largest = max(range(len(fractions)), key=lambda k: (fractions[k], -k))
    sizes[largest] += n - sum(sizes)
    return sizes


def make_splits(tasks: Sequence[Task], fractions: Sequence[float] = (0.5, 0.1, 0.4),
                seed: int = 42) -> dict[str, list[int]]:
    """Disjoint sae / tuning / validation task ids (each sorted), stratified by complexity.

    Systematic stratified sampling: tasks are ordered by complexity (ties in a seeded random order)
    and each position gets the split that is furthest below its share so far, so every run of
    consecutive tasks (any complexity range) is divided in proportion to the split sizes. Labels are
    then shuffled within windows of about 1 / (smallest fraction) positions (10 for the defaults), so
    the seed also decides where the few tasks of rare, high complexities go. Sizes: ``split_sizes``.
    """

    fractions = _check_fractions(fractions)
    rng = np.random.default_rng(seed)
    ordered = _complexity_order(tasks, rng)
    labels = _interleaved_labels(split_sizes(len(ordered), fractions))
    labels = _shuffle_windows(labels, _window_size(fractions), rng)
    out: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    for task, label in zip(ordered, labels, strict=True):
        out[SPLIT_NAMES[label]].append(task.task_id)
    return {name: sorted(ids) for name, ids in out.items()}


def _check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != len(SPLIT_NAMES) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"split fractions must be {len(SPLIT_NAMES)} non-negative numbers summing to 1 "
                        f"(for {', '.join(SPLIT_NAMES)}), got {fractions}; fix data.split_fractions")
    return fractions


def _complexity_order(tasks: Sequence[Task], rng) -> list[Task]:
    """Tasks by complexity, equal complexities in a seeded random order (independent of input order)."""
    by_id = sorted(tasks, key=lambda t: t.task_id)
    keys = rng.permutation(len(by_id))
    order = sorted(range(len(by_id)), key=lambda i: (by_id[i].complexity, keys[i]))
    return [by_id[i] for i in order]


def _interleaved_labels(sizes: Sequence[int]) -> list[int]:
    """Split index per position: each goes to the split with the largest deficit
    sizes[k] * (i + 1) / n - assigned[k] (the earlier split on ties), never past its size."""
    n = sum(sizes)
    assigned = [0] * len(sizes)
    labels = []
    for i in range(n):
        open_splits = [k for k in range(len(sizes)) if assigned[k] < sizes[k]]
        best = max(open_splits, key=lambda k: (sizes[k] * (i + 1) / n - assigned[k], -k))
        assigned[best] += 1
        labels.append(best)
    return labels


def _window_size(fractions: Sequence[float]) -> int:
    return max(1, round(1 / min(f for f in fractions if f > 0)))


def _shuffle_windows(labels: list[int], window: int, rng) -> list[int]:
    out = list(labels)
    for start in range(0, len(out), window):
        chunk = out[start:start + window]
        out[start:start + window] = [chunk[i] for i in rng.permutation(len(chunk))]
    return out


def split_summary(tasks: Sequence[Task], splits: dict[str, Sequence[int]]) -> dict[str, Any]:
    """Per split and for 'all' tasks: n, mean complexity, and count and share of each difficulty bucket.

    Written next to the splits so anyone can check that the splits look like the whole.
    """
    by_id = {t.task_id: t for t in tasks}
    unknown = sorted(i for ids in splits.values() for i in ids if i not in by_id)
    if unknown:
        raise DataError(f"splits name task ids that are not in the dataset: {unknown[:_MAX_LISTED]}; "
                        "make the splits from the same tasks")
    groups = {name: [by_id[i] for i in ids] for name, ids in splits.items()}
    groups["all"] = list(tasks)
    return {name: _describe(group) for name, group in groups.items()}


def _describe(group: Sequence[Task]) -> dict[str, Any]:
    n = len(group)
    counts = {b: sum(t.difficulty == b for t in group) for b in BUCKETS}
    return {
        "n": n,
        "mean_complexity": sum(t.complexity for t in group) / n if n else None,
        "bucket_counts": counts,
        "bucket_shares": {b: c / n if n else None for b, c in counts.items()},
    }
