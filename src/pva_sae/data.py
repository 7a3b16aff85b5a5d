"""MBPP tasks: loading (packaged copy, local file or the hub), validation, difficulty and splits.

MBPP (Austin et al. 2021, CC BY 4.0) ships in ``assets/mbpp/``. Difficulty is the cyclomatic
complexity of the reference solution (radon ``cc_visit``, max over blocks), bucketed easy = 1,
medium = 2-3, hard >= 4. Splits (SAE analysis / hyperparameter tuning / validation) are stratified by
complexity and seeded.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

REQUIRED_FIELDS = {"task_id": int, "text": str, "code": str, "test_list": list}
OPTIONAL_FIELDS = {"test_setup_code": str, "challenge_test_list": list}
SPLIT_NAMES = ("sae", "tuning", "validation")
HUB_DATASET = ("google-research-datasets/mbpp", "full")


class DataError(ValueError):
    """The dataset is malformed; the message names the bad task ids."""


@dataclass(frozen=True)
class Task:
    task_id: int
    text: str
    code: str
    test_list: tuple[str, ...]
    test_setup_code: str
    challenge_test_list: tuple[str, ...]
    complexity: int
    difficulty: str


def packaged_path() -> Path:
    return Path(str(resources.files("pva_sae") / "assets" / "mbpp" / "mbpp.jsonl"))


def _read_rows(source: str) -> list[dict[str, Any]]:
    if source == "hub":
        return _hub_rows()
    path = packaged_path() if source == "packaged" else Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist; use data.source=packaged, hub, or an MBPP-format file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            return [json.loads(line) for line in lines if line.strip()]
        if suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            return rows if isinstance(rows, list) else rows.get("records") or rows.get("data") or []
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"dataset file {path} is not valid {suffix.lstrip('.')}: {exc}") from None
    raise DataError(f"dataset file {path}: unsupported extension {suffix!r} (use .jsonl, .json or .parquet)")


def _hub_rows() -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError("data.source=hub needs the `datasets` package (pip install datasets) and network access; "
                        "or use data.source=packaged") from None
    try:
        ds = datasets.load_dataset(*HUB_DATASET)
    except Exception as exc:  # the hub raises many types when offline
        raise DataError(f"could not load {HUB_DATASET[0]} from the hub ({type(exc).__name__}: {exc}); "
                        "use data.source=packaged or a local file") from None
    return [dict(row) for split in ds.values() for row in split]


def validate_rows(rows: Sequence[dict[str, Any]]) -> None:
    """Raise DataError listing every bad row by task_id (or position when the id itself is bad)."""
    problems: dict[str, list[str]] = {}
    seen: set[int] = set()
    for pos, row in enumerate(rows):
        tid = row.get("task_id") if isinstance(row, dict) else None
        name = f"task_id {tid}" if isinstance(tid, int) else f"row {pos}"
        errs = _row_problems(row, seen)
        if errs:
            problems[name] = errs
        if isinstance(tid, int):
            seen.add(tid)
    if problems:
        shown = "; ".join(f"{k}: {', '.join(v)}" for k, v in list(problems.items())[:20])
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise DataError(f"{len(problems)} malformed MBPP row(s): {shown}{more}")


def _row_problems(row: Any, seen: set[int]) -> list[str]:
    if not isinstance(row, dict):
        return ["not an object"]
    errs = [f"missing {k}" for k in REQUIRED_FIELDS if k not in row]
    errs += [f"{k} is not {t.__name__}" for k, t in {**REQUIRED_FIELDS, **OPTIONAL_FIELDS}.items()
             if k in row and row[k] is not None and not isinstance(row[k], t)]
    if errs:
        return errs
    if row["task_id"] in seen:
        errs.append("duplicate task_id")
    if not row["text"].strip():
        errs.append("empty text")
    tests = row["test_list"]
    if len(tests) != 3 or not all(isinstance(t, str) and t.strip().startswith("assert") for t in tests):
        errs.append("test_list must hold 3 assert statements")
    try:
        with warnings.catch_warnings():  # reference code has invalid escapes like "\d": not our problem
            warnings.simplefilter("ignore")
            compile(_normalise_code(row["code"]), f"<task {row['task_id']}>", "exec")
    except SyntaxError as exc:
        errs.append(f"reference code does not parse ({exc.msg})")
    return errs


def _normalise_code(code: str) -> str:
    return code.replace("\r\n", "\n").replace("\r", "\n")


def cyclomatic_complexity(code: str) -> int:
    """Max cyclomatic complexity over the blocks of ``code`` (radon); 1 for code with no block."""
    from radon.complexity import cc_visit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        blocks = cc_visit(_normalise_code(code))
    return max((b.complexity for b in blocks), default=1)


def difficulty_bucket(complexity: int) -> str:
    if complexity <= 1:
        return "easy"
    return "medium" if complexity <= 3 else "hard"


def _task(row: dict[str, Any]) -> Task:
    c = cyclomatic_complexity(row["code"])
    return Task(task_id=int(row["task_id"]), text=row["text"], code=_normalise_code(row["code"]),
                test_list=tuple(row["test_list"]), test_setup_code=row.get("test_setup_code") or "",
                challenge_test_list=tuple(row.get("challenge_test_list") or ()), complexity=c,
                difficulty=difficulty_bucket(c))


def load_tasks(source: str = "packaged") -> list[Task]:
    """All tasks of ``source`` ('packaged', 'hub' or a file), validated, sorted by task_id."""
    rows = _read_rows(source)
    if not rows:
        raise DataError(f"dataset {source!r} holds no rows")
    validate_rows(rows)
    return sorted((_task(r) for r in rows), key=lambda t: t.task_id)


def dataset_sha256(source: str) -> str:
    """sha256 of the source file's bytes (for 'hub', of the rows as canonical JSON)."""
    if source == "hub":
        blob = json.dumps(sorted(_hub_rows(), key=lambda r: r["task_id"]), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()
    path = packaged_path() if source == "packaged" else Path(source).expanduser()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def select_range(tasks: Sequence[Task], start_idx: int, end_idx: int | None) -> list[Task]:
    """Tasks at positions start_idx..end_idx (inclusive; None = last)."""
    last = len(tasks) - 1
    end = last if end_idx is None else end_idx
    if not 0 <= start_idx <= end <= last:
        raise DataError(f"task range {start_idx}..{end_idx} is outside 0..{last} ({len(tasks)} tasks)")
    return list(tasks[start_idx:end + 1])


# --------------------------------------------------------------------------- splits

def _strata(tasks: Sequence[Task]) -> dict[int, list[int]]:
    """Task ids grouped by complexity; complexities >= 6 share one stratum (few tasks each)."""
    groups: dict[int, list[int]] = {}
    for t in tasks:
        groups.setdefault(min(t.complexity, 6), []).append(t.task_id)
    return groups


def _allocate(n: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder rounding of n * fractions (ties go to the earlier split)."""
    raw = [n * f for f in fractions]
    counts = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def make_splits(tasks: Sequence[Task], fractions: Sequence[float] = (0.5, 0.1, 0.4),
                seed: int = 42) -> dict[str, list[int]]:
    """Stratified, seeded split into sae / tuning / validation task ids.

    Totals are fixed first (largest remainder of len(tasks) * fractions: 489/97/388 for 974 tasks);
    then each complexity stratum is shuffled and dealt out in proportion, and the rounding is
    reconciled so the totals hold exactly.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    totals = _allocate(len(tasks), fractions)
    strata = _strata(tasks)
    shares = {c: _allocate(len(ids), fractions) for c, ids in strata.items()}
    _reconcile(shares, totals, strata)
    out: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    for c in sorted(strata):
        ids = sorted(strata[c])
        perm = [ids[i] for i in rng.permutation(len(ids))]
        start = 0
        for name, k in zip(SPLIT_NAMES, shares[c]):
            out[name].extend(perm[start:start + k])
            start += k
    return {name: sorted(ids) for name, ids in out.items()}


def _reconcile(shares: dict[int, list[int]], totals: list[int], strata: dict[int, list[int]]) -> None:
    """Move single tasks between splits, largest strata first, until every split has its total."""
    for _ in range(10 * len(strata) + 10):
        current = [sum(s[i] for s in shares.values()) for i in range(len(totals))]
        over = [i for i in range(len(totals)) if current[i] > totals[i]]
        under = [i for i in range(len(totals)) if current[i] < totals[i]]
        if not over:
            return
        src, dst = over[0], under[0]
        for c in sorted(strata, key=lambda c: -len(strata[c])):
            if shares[c][src] > 0:
                shares[c][src] -= 1
                shares[c][dst] += 1
                break


def split_summary(tasks: Sequence[Task], splits: dict[str, list[int]]) -> dict[str, Any]:
    """Per split (and 'all'): n, mean complexity and the share of each difficulty bucket."""
    by_id = {t.task_id: t for t in tasks}
    groups = {**{k: [by_id[i] for i in v if i in by_id] for k, v in splits.items()}, "all": list(tasks)}
    out = {}
    for name, group in groups.items():
        n = len(group)
        out[name] = {
            "n": n,
            "mean_complexity": sum(t.complexity for t in group) / n if n else None,
            "buckets": {b: (sum(t.difficulty == b for t in group) / n if n else None)
                        for b in ("easy", "medium", "hard")},
        }
    return out
