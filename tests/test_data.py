import json
import sys
import types

import pytest

from pva_sae.data.mbpp import (
    SPLIT_NAMES,
    DataError,
    Task,
    cyclomatic_complexity,
    dataset_sha256,
    difficulty_bucket,
    load_tasks,
    make_splits,
    select_range,
    split_sizes,
    split_summary,
    validate_rows,
)

PACKAGED_SHA256 = "0b7004a79cd62d9ec7ecdd5a6e5f0ef1210ff00b286df3c5d5b57bf38c58e19a"

# A split "matches the whole" when the share of each difficulty bucket is within BUCKET_TOLERANCE of the
# share over all tasks and its mean complexity is within MEAN_TOLERANCE of the overall mean.
BUCKET_TOLERANCE = 0.03
MEAN_TOLERANCE = 0.15


@pytest.fixture(scope="module")
def tasks():
    return load_tasks("packaged")


def good_row(task_id=1, **changes):
    row = {"task_id": task_id, "text": "Write a function to add one.", "code": "def f(x):\r\n\treturn x + 1",
           "test_setup_code": "", "test_list": ["assert f(1) == 2", "assert f(2) == 3", "assert f(0) == 1"],
           "challenge_test_list": []}
    row.update(changes)
    return row


def mismatches(summary, name):
    """How split ``name`` differs from the whole beyond the tolerances (empty when it matches)."""
    part, whole = summary[name], summary["all"]
    out = []
    if abs(part["mean_complexity"] - whole["mean_complexity"]) > MEAN_TOLERANCE:
        out.append(f"mean complexity {part['mean_complexity']:.3f} vs {whole['mean_complexity']:.3f}")
    for bucket, share in whole["bucket_shares"].items():
        if abs(part["bucket_shares"][bucket] - share) > BUCKET_TOLERANCE:
            out.append(f"{bucket} share {part['bucket_shares'][bucket]:.3f} vs {share:.3f}")
    return out


# --------------------------------------------------------------------------- the packaged data

def test_packaged_dataset(tasks):
    assert len(tasks) == 974
    assert [t.task_id for t in tasks] == list(range(1, 975))
    assert all(len(t.test_list) == 3 and isinstance(t.test_list, tuple) for t in tasks)
    assert all("\r" not in t.code for t in tasks)
    assert [t.task_id for t in tasks if t.test_setup_code] == [367, 927]
    assert sum(bool(t.challenge_test_list) for t in tasks) == 11
    assert dataset_sha256("packaged") == PACKAGED_SHA256


def test_packaged_difficulty(tasks):
    complexities = [t.complexity for t in tasks]
    assert min(complexities) == 1 and max(complexities) == 16
    assert sum(complexities) == 2770  # mean 2.844
    counts = {b: sum(t.difficulty == b for t in tasks) for b in ("easy", "medium", "hard")}
    assert counts == {"easy": 268, "medium": 443, "hard": 263}
    assert all(t.difficulty == difficulty_bucket(t.complexity) for t in tasks)


# --------------------------------------------------------------------------- validation

def test_good_rows_pass():
    validate_rows([good_row(1), good_row(2, test_setup_code=None, challenge_test_list=None)])
    validate_rows([good_row(3, code="import re\nx = re.compile('\\d')")])  # invalid escape: a warning only


def test_validation_names_every_bad_task_id():
    rows = [
        good_row(1),
        good_row(2, test_list=["assert f(1) == 2"]),
        good_row(3, code="def f(:\n    return 1"),
        good_row(1),
        {"text": "no id"},
        good_row(5, text="  \r\n"),
        good_row(6, test_list=["assert f(1) == 2", "f(2) == 3", "assert assert f(0) == 1"]),
        good_row(7, test_list="assert f(1) == 2"),
        good_row(8, test_list=["assert f(1) == 2", 3, "assert f(0) == 1"]),
        good_row(9, code=None),
        good_row("10"),
        good_row(True),
        "not a row",
    ]
    with pytest.raises(DataError) as exc:
        validate_rows(rows)
    msg = str(exc.value)
    for expected in [
        "task_id 2: test_list has 1 entries, expected 3 assert statements",
        "task_id 3: reference code does not parse (line 1:",
        "task_id 1: duplicate task_id",
        "row 4: missing task_id; missing code; missing test_list",
        "task_id 5: empty text",
        "task_id 6: test 1 is not a single assert statement: 'f(2) == 3'; test 2 is not a single assert",
        "task_id 7: test_list is str, expected list or tuple",
        "task_id 8: test_list holds non-string entries",
        "task_id 9: code is null",
        "row 10: task_id is str, expected int",
        "row 11: task_id is bool, expected int",
        "row 12: not an object but a str",
    ]:
        assert expected in msg, expected
    assert msg.startswith("12 malformed MBPP row(s)")
    assert "task_id 1:" not in msg.split("|")[0]  # the first, valid row 1 is not reported


def test_validation_lists_at_most_twenty_problems():
    with pytest.raises(DataError, match=r"25 malformed .* and 5 more"):
        validate_rows([good_row(i, text="") for i in range(25)])


# --------------------------------------------------------------------------- loading

def test_load_from_local_files(tmp_path):
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("\n".join(json.dumps(good_row(i)) for i in (3, 1)) + "\n\n")
    loaded = load_tasks(str(jsonl))
    assert [t.task_id for t in loaded] == [1, 3]
    assert loaded[0] == Task(1, "Write a function to add one.", "def f(x):\n\treturn x + 1",
                             ("assert f(1) == 2", "assert f(2) == 3", "assert f(0) == 1"), "", (), 1, "easy")
    as_json = tmp_path / "m.json"
    as_json.write_text(json.dumps([good_row(2)]))
    assert [t.task_id for t in load_tasks(str(as_json))] == [2]
    assert dataset_sha256(str(as_json)) != dataset_sha256(str(jsonl))


def test_load_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist([good_row(2), good_row(1, challenge_test_list=["assert f(5) == 6"])]), path)
    loaded = load_tasks(str(path))
    assert [t.task_id for t in loaded] == [1, 2] and loaded[0].challenge_test_list == ("assert f(5) == 6",)


@pytest.mark.parametrize("name, content, fragment", [
    ("bad.jsonl", json.dumps(good_row(1, test_list="nope")) + "\n", "task_id 1: test_list is str"),
    ("broken.jsonl", '{"task_id": 1,\n', "line 1: not valid JSON"),
    ("object.json", json.dumps({"rows": [good_row(1)]}), "must hold a JSON array"),
    ("empty.jsonl", "\n", "holds no tasks"),
    ("tasks.csv", "task_id,text\n", "unsupported extension '.csv'"),
    ("broken.parquet", "not parquet", "not valid parquet"),
])
def test_bad_files_are_refused(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=fragment):
        load_tasks(str(path))


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(DataError, match="does not exist.*'packaged', 'hub'"):
        load_tasks(str(tmp_path / "missing.jsonl"))


def test_hub_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match=r"needs the `datasets` package: pip install"):
        load_tasks("hub")


def test_hub_offline(monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError, match="could not load google-research-datasets/mbpp .*ConnectionError"):
        load_tasks("hub")


def test_hub_rows_from_every_split(monkeypatch):
    calls = []

    def load_dataset(*args):
        calls.append(args)
        return {"train": [good_row(2)], "test": [good_row(1)], "validation": [], "prompt": [good_row(3)]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert [t.task_id for t in load_tasks("hub")] == [1, 2, 3]
    assert calls == [("google-research-datasets/mbpp", "full")]
    assert dataset_sha256("hub") == dataset_sha256("hub") and len(dataset_sha256("hub")) == 64


# --------------------------------------------------------------------------- complexity, buckets, ranges

@pytest.mark.parametrize("code, expected", [
    ("x = 1\nif x:\n    print(x)", 1),  # module-level code has no block: one path by definition
    ("def f(x):\n    return x", 1),
    ("def f(x):\n    if x > 0:\n        return 1\n    return 2", 2),
    ("def f(x):\n    if x > 0:\n        return 1\n    elif x < 0:\n        return -1\n    return 0", 3),
    ("def f(xs):\r\n\tfor x in xs:\r\n\t\tif x and x > 2:\r\n\t\t\treturn x", 4),  # for, if, `and`
    ("def f(xs):\n    return [x for x in xs if x]", 3),  # the comprehension's loop and its condition
    ("def f(x):\n    return 1 if x else 2", 2),
    ("def a(x):\n    return x\n\ndef b(x):\n    while x:\n        x -= 1\n    return x", 2),  # max over blocks
    ("class A:\n    def a(self):\n        return 1\n    def b(self, x):\n        if x:\n            return 1\n"
     "        if x > 1:\n            return 2\n        return 3", 3),  # methods count as blocks
])
def test_cyclomatic_complexity(code, expected):
    assert cyclomatic_complexity(code) == expected


def test_difficulty_buckets():
    assert [difficulty_bucket(c) for c in (1, 2, 3, 4, 5, 16)] == ["easy", "medium", "medium", "hard", "hard", "hard"]


def test_select_range(tasks):
    assert [t.task_id for t in select_range(tasks, 0, 2)] == [1, 2, 3]
    assert [t.task_id for t in select_range(tasks, 970, None)] == [971, 972, 973, 974]
    assert len(select_range(tasks, 0, None)) == 974
    for start, end in [(0, 974), (-1, 3), (5, 4), (974, None)]:
        with pytest.raises(DataError, match="outside the 974 tasks .positions 0..973."):
            select_range(tasks, start, end)


# --------------------------------------------------------------------------- splits

def test_split_sizes_rounding():
    assert split_sizes(974, (0.5, 0.1, 0.4)) == [488, 97, 389]  # reference sizes 489/97/388, each within 1
    assert split_sizes(10, (0.5, 0.1, 0.4)) == [5, 1, 4]
    assert split_sizes(100, (0.29, 0.29, 0.42)) == [29, 29, 42]  # 100 * 0.29 is 28.999999999999996 in floats
    assert split_sizes(7, (0.2, 0.4, 0.4)) == [1, 4, 2]  # floors 1, 2, 2; the first largest takes the rest
    assert split_sizes(0, (0.5, 0.1, 0.4)) == [0, 0, 0]


def test_splits_are_a_seeded_partition(tasks):
    splits = make_splits(tasks, (0.5, 0.1, 0.4), seed=42)
    assert list(splits) == list(SPLIT_NAMES)
    assert {k: len(v) for k, v in splits.items()} == {"sae": 488, "tuning": 97, "validation": 389}
    assert all(ids == sorted(ids) for ids in splits.values())
    assert sorted(i for ids in splits.values() for i in ids) == list(range(1, 975))
    assert make_splits(tasks, seed=42) == splits
    assert make_splits(list(reversed(tasks)), seed=42) == splits  # input order does not matter
    other = make_splits(tasks, seed=7)
    assert other != splits and all(other[k] != splits[k] for k in SPLIT_NAMES)


def test_other_fractions(tasks):
    splits = make_splits(tasks, (0.6, 0.1, 0.3), seed=0)
    assert [len(splits[k]) for k in SPLIT_NAMES] == split_sizes(974, (0.6, 0.1, 0.3)) == [585, 97, 292]
    assert [len(v) for v in make_splits(tasks[:3]).values()] == [2, 0, 1]
    assert make_splits([], seed=1) == {"sae": [], "tuning": [], "validation": []}
    for bad in [(0.5, 0.5), (0.5, 0.6, -0.1), (0.5, 0.2, 0.2)]:
        with pytest.raises(DataError, match="split fractions must be 3 non-negative numbers summing to 1"):
            make_splits(tasks, bad)


@pytest.mark.parametrize("seed", range(25))
def test_every_split_matches_the_whole(tasks, seed):
    summary = split_summary(tasks, make_splits(tasks, seed=seed))
    for name in SPLIT_NAMES:
        assert mismatches(summary, name) == [], (seed, name)


def test_tolerance_catches_the_thesis_skew(tasks):
    # The thesis code's tuning split had mean complexity 3.38 against 2.73 overall: build a tuning split
    # that is as far off (swap its easiest tasks for the hardest validation tasks) and check it is caught.
    by_id = {t.task_id: t for t in tasks}
    splits = make_splits(tasks, seed=42)
    tuning = sorted(splits["tuning"], key=lambda i: by_id[i].complexity)
    validation = sorted(splits["validation"], key=lambda i: -by_id[i].complexity)
    overall = sum(t.complexity for t in tasks) / len(tasks)
    swaps = 0
    while sum(by_id[i].complexity for i in tuning) / len(tuning) < overall + (3.38 - 2.73):
        tuning[swaps], validation[swaps] = validation[swaps], tuning[swaps]
        swaps += 1
    skewed = {"sae": splits["sae"], "tuning": tuning, "validation": validation}
    assert swaps < 10
    assert mismatches(split_summary(tasks, skewed), "tuning")


def test_split_summary(tasks):
    summary = split_summary(tasks, make_splits(tasks))
    assert list(summary) == [*SPLIT_NAMES, "all"]
    assert summary["all"]["n"] == 974 and summary["all"]["bucket_counts"]["easy"] == 268
    for part in summary.values():
        assert sum(part["bucket_counts"].values()) == part["n"]
        assert sum(part["bucket_shares"].values()) == pytest.approx(1)
    empty = split_summary(tasks, {"sae": [], "tuning": [1], "validation": []})
    assert empty["sae"]["mean_complexity"] is None and empty["tuning"]["n"] == 1
    with pytest.raises(DataError, match=r"not in the dataset: \[9999\]"):
        split_summary(tasks, {"sae": [9999]})
