import json

import pytest

from pva_sae.data import (DataError, cyclomatic_complexity, dataset_sha256, difficulty_bucket, load_tasks,
                          make_splits, select_range, split_summary, validate_rows)

# A split matches the whole when each difficulty bucket's share is within 0.03 of the overall share
# and its mean complexity within 0.15 of the overall mean.
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


def test_packaged_dataset(tasks):
    assert len(tasks) == 974
    assert [t.task_id for t in tasks] == list(range(1, 975))
    assert all(len(t.test_list) == 3 for t in tasks)
    assert {t.difficulty for t in tasks} == {"easy", "medium", "hard"}
    assert min(t.complexity for t in tasks) == 1 and max(t.complexity for t in tasks) == 16
    assert dataset_sha256("packaged") == "0b7004a79cd62d9ec7ecdd5a6e5f0ef1210ff00b286df3c5d5b57bf38c58e19a"
    assert "\r" not in tasks[0].code


def test_validation_names_bad_task_ids():
    rows = [good_row(1), good_row(2, test_list=["assert f(1) == 2"]), good_row(3, code="def f(:"),
            good_row(1), {"text": "x"}, good_row(5, text="  ")]
    with pytest.raises(DataError) as exc:
        validate_rows(rows)
    msg = str(exc.value)
    assert "task_id 2: test_list must hold 3 assert statements" in msg
    assert "task_id 3: reference code does not parse" in msg
    assert "task_id 1: duplicate task_id" in msg
    assert "row 4: missing task_id" in msg
    assert "task_id 5: empty text" in msg
    validate_rows([good_row(1), good_row(2)])


def test_load_from_local_files(tmp_path, tasks):
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("\n".join(json.dumps(good_row(i)) for i in (3, 1)) + "\n")
    assert [t.task_id for t in load_tasks(str(jsonl))] == [1, 3]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good_row(1, test_list="nope")) + "\n")
    with pytest.raises(DataError, match="task_id 1: test_list is not list"):
        load_tasks(str(bad))
    with pytest.raises(DataError, match="does not exist"):
        load_tasks(str(tmp_path / "missing.jsonl"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"task_id": 1,\n')
    with pytest.raises(DataError, match="not valid jsonl"):
        load_tasks(str(broken))


def test_complexity_and_buckets():
    assert cyclomatic_complexity("x = 1") == 1
    assert cyclomatic_complexity("def f(x):\n    return x") == 1
    assert cyclomatic_complexity("def f(x):\n    if x:\n        return 1\n    return 2") == 2
    assert cyclomatic_complexity("def f(x):\r\n\tfor i in x:\r\n\t\tif i and x:\r\n\t\t\treturn i") == 4
    assert [difficulty_bucket(c) for c in (1, 2, 3, 4, 16)] == ["easy", "medium", "medium", "hard", "hard"]


def test_select_range(tasks):
    assert [t.task_id for t in select_range(tasks, 0, 2)] == [1, 2, 3]
    assert len(select_range(tasks, 970, None)) == 4
    with pytest.raises(DataError, match="outside 0..973"):
        select_range(tasks, 0, 974)


def test_splits_are_a_seeded_partition(tasks):
    splits = make_splits(tasks, (0.5, 0.1, 0.4), seed=42)
    assert {k: len(v) for k, v in splits.items()} == {"sae": 487, "tuning": 97, "validation": 390}
    ids = [i for v in splits.values() for i in v]
    assert sorted(ids) == list(range(1, 975))
    assert make_splits(tasks, seed=42) == splits
    assert make_splits(tasks, seed=7) != splits


@pytest.mark.parametrize("seed", [42, 0, 123])
def test_every_split_matches_the_whole(tasks, seed):
    summary = split_summary(tasks, make_splits(tasks, seed=seed))
    whole = summary["all"]
    for name in ("sae", "tuning", "validation"):
        part = summary[name]
        assert abs(part["mean_complexity"] - whole["mean_complexity"]) <= MEAN_TOLERANCE, (name, part)
        for bucket, share in whole["buckets"].items():
            assert abs(part["buckets"][bucket] - share) <= BUCKET_TOLERANCE, (name, bucket, part)


def test_tolerance_catches_an_unstratified_split(tasks):
    # A split like the thesis code's (tuning mean 3.38 vs 2.73) must fail the check above.
    hardest = sorted(tasks, key=lambda t: -t.complexity)
    skewed = {"sae": [t.task_id for t in hardest[97:586]], "tuning": [t.task_id for t in hardest[:97]],
              "validation": [t.task_id for t in hardest[586:]]}
    summary = split_summary(tasks, skewed)
    assert abs(summary["tuning"]["mean_complexity"] - summary["all"]["mean_complexity"]) > MEAN_TOLERANCE
