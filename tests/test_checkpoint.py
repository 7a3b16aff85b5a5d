import json

import pytest

from pva_sae.config import CheckpointConfig, Config
from pva_sae.rundir.atomic import atomic_write_json
from pva_sae.rundir.checkpoint import BuildState, Checkpointer, CheckpointError, ask_resume, decide_resume, read_state
from pva_sae.rundir.paths import RunDir


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def make(tmp_path, **cfg_kwargs):
    run = RunDir.at(tmp_path / "run").ensure()
    cfg = CheckpointConfig(**cfg_kwargs)
    clock = FakeClock()
    return run, cfg, Checkpointer(run, cfg, Config().to_dict(), 0, 9, clock=clock), clock


def state_with(n, batches=()):
    return BuildState(records=[{"task_id": i, "sample_index": 0} for i in range(n)], done_batches=set(batches))


def test_checkpoint_every_n_records_and_latest_by_sequence(tmp_path):
    run, cfg, cp, _ = make(tmp_path, every_n_records=4)
    state = state_with(3)
    assert cp.maybe_save(state) is None
    state.records.append({"task_id": 3, "sample_index": 0})
    first = cp.maybe_save(state)
    assert first is not None and first.parent == run.checkpoints
    state.records.extend({"task_id": i, "sample_index": 0} for i in range(4, 8))
    second = cp.maybe_save(state)
    assert cp.find_latest() == second
    loaded, _ = read_state(second)
    assert loaded.n_records == 8 and loaded.sequence == 2


def test_autosave_by_time_and_pruning(tmp_path):
    run, cfg, cp, clock = make(tmp_path, every_n_records=1000, autosave_interval_s=10, keep_autosaves=2)
    state = state_with(1)
    for _ in range(4):
        clock.t += 11
        assert cp.maybe_save(state).parent == run.autosaves
    assert len(list(run.autosaves.glob("autosave_*.json"))) == 2
    assert cp.find_latest().name.startswith("autosave_")


def test_corrupted_checkpoint_is_named(tmp_path):
    run, cfg, cp, _ = make(tmp_path)
    bad = run.checkpoints / "checkpoint_0_9_20250101_000000_00001.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"format_version": 1, "sequence": 1, "rec')
    with pytest.raises(CheckpointError, match="corrupted"):
        read_state(bad)
    assert cp.find_latest() is None  # an unreadable save is skipped, not chosen
    other = run.checkpoints / "checkpoint_0_9_20250101_000000_00002.json"
    atomic_write_json(other, {"hello": 1})
    with pytest.raises(CheckpointError, match="lacks"):
        read_state(other)


def test_resume_with_different_config_names_fields(tmp_path):
    run, cfg, cp, _ = make(tmp_path, every_n_records=1)
    path = cp.save(state_with(2, [0]), "checkpoint")
    other = Config()
    other.generation.max_new_tokens = 7
    other.model.name = "other"
    cp2 = Checkpointer(run, cfg, other.to_dict(), 0, 9)
    with pytest.raises(CheckpointError, match="generation.max_new_tokens, model.name"):
        cp2.load_for_resume(path)
    # checkpoint/output settings may change between runs
    same = Config()
    same.checkpoint.every_n_records = 3
    state = Checkpointer(run, cfg, same.to_dict(), 0, 9).load_for_resume(path)
    assert state.done_batches == {0} and state.n_records == 2


def test_decide_resume_modes(tmp_path):
    run, cfg, cp, _ = make(tmp_path)
    cp.save(state_with(5, [0, 1]), "checkpoint")
    asked = []

    def answer(text):
        asked.append(text)
        return "y"

    state = decide_resume(cp, CheckpointConfig(resume="ask"), interactive=True, input_fn=answer)
    assert state.n_records == 5
    assert asked and asked[0].startswith("Found checkpoint with 5 processed records")
    assert decide_resume(cp, CheckpointConfig(resume="ask"), interactive=False).n_records == 5
    assert decide_resume(cp, CheckpointConfig(resume="auto")).n_records == 5
    state = decide_resume(cp, CheckpointConfig(resume="ask"), interactive=True, input_fn=lambda _: "n")
    assert state.n_records == 0
    # starting over keeps the old saves, moved aside
    assert cp.find_latest() is None
    assert list(run.datasets.glob("superseded_*/checkpoint_*.json"))


def test_resume_from_explicit_file(tmp_path):
    run, cfg, cp, _ = make(tmp_path)
    first = cp.save(state_with(1, [0]), "checkpoint")
    cp.save(state_with(3, [0, 1]), "checkpoint")
    state = decide_resume(cp, CheckpointConfig(resume_from=str(first)))
    assert state.n_records == 1
    with pytest.raises(CheckpointError, match="does not exist"):
        decide_resume(cp, CheckpointConfig(resume_from=str(tmp_path / "nope.json")))


def test_ask_resume_answers():
    assert ask_resume(3, RunDir.at("/x").config, lambda _: "yes")
    assert not ask_resume(3, RunDir.at("/x").config, lambda _: "no")

    def eof(_):
        raise EOFError

    assert ask_resume(3, RunDir.at("/x").config, eof)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "a" / "b.json"
    atomic_write_json(target, {"x": 1})
    atomic_write_json(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 2}
    assert [p.name for p in target.parent.iterdir()] == ["b.json"]


def test_saves_append_new_records_only_and_stay_small(tmp_path):
    """Checkpoints refer to an append-only journal: 20 saves of 10 new records write 200 journal lines in
    all, and every checkpoint file stays small however many records the build holds."""
    run, cfg, cp, _ = make(tmp_path, every_n_records=10, keep_checkpoints=3)
    state = BuildState()
    for i in range(20):
        state.records.extend({"task_id": 10 * i + j, "sample_index": 0, "program": "x" * 200} for j in range(10))
        state.done_batches.add(i)
        cp.maybe_save(state)
    [journal] = run.checkpoints.glob("journal_*.jsonl")
    assert len(journal.read_text().splitlines()) == 200
    saves = sorted(run.checkpoints.glob("checkpoint_*.json"))
    assert len(saves) == 3                                        # the last few are kept
    # each holds the config and the batch indices, never the records: its size does not grow with them
    config_bytes = len(json.dumps(Config().to_dict(), indent=2))
    assert all(p.stat().st_size < config_bytes + 1024 for p in saves)
    assert journal.stat().st_size > 200 * 200
    loaded, _ = read_state(cp.find_latest())
    assert loaded.records == state.records and loaded.done_batches == set(range(20))


def test_an_older_checkpoint_reads_its_own_records_and_a_resume_starts_a_new_journal(tmp_path):
    run, cfg, cp, _ = make(tmp_path, every_n_records=5, keep_checkpoints=10)
    state = state_with(5, batches={0})
    first = cp.maybe_save(state)
    state.records.extend({"task_id": i, "sample_index": 0} for i in range(5, 12))   # journaled later, then a crash
    cp.save(state, "emergency")
    resumed = Checkpointer(run, cfg, Config().to_dict(), 0, 9)
    old = resumed.load_for_resume(first)
    assert old.n_records == 5 and old.records == state.records[:5]
    old.records.append({"task_id": 99, "sample_index": 0})
    again = resumed.save(old, "checkpoint")
    assert read_state(again)[0].records == state.records[:5] + [{"task_id": 99, "sample_index": 0}]
    assert len(list(run.checkpoints.glob("journal_*.jsonl"))) == 2


def test_a_checkpoint_whose_journal_is_gone_is_named(tmp_path):
    run, cfg, cp, _ = make(tmp_path, every_n_records=1)
    path = cp.maybe_save(state_with(3))
    for journal in run.checkpoints.glob("journal_*.jsonl"):
        journal.unlink()
    with pytest.raises(CheckpointError, match="journal"):
        read_state(path)


def _answers(*replies):
    """An input function that replies in turn (an exception instance is raised) and records each question."""
    asked, queue = [], list(replies)

    def input_fn(question):
        asked.append(question)
        reply = queue.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        return reply

    return input_fn, asked


@pytest.mark.parametrize("replies, resumed", [
    (["", "maybe", " Y "], True),           # only y/yes resumes ...
    (["nope", "x", "No"], False),           # ... only n/no starts over ...
    (["?", EOFError()], True),              # ... and end of input resumes, as a non-interactive run does
])
def test_resume_prompt_asks_again_until_y_or_n(replies, resumed):
    input_fn, asked = _answers(*replies)
    assert ask_resume(4, RunDir.at("/x").config, input_fn) is resumed
    assert len(asked) == len(replies)
    assert asked[0].startswith("Found checkpoint with 4 processed records")
    assert all("Please answer y (resume) or n (start over" in q for q in asked[1:])


def test_a_stray_answer_does_not_discard_the_saves(tmp_path):
    run, cfg, cp, _ = make(tmp_path)
    cp.save(state_with(5, [0, 1]), "checkpoint")
    input_fn, asked = _answers("yess", "y")
    state = decide_resume(cp, CheckpointConfig(resume="ask"), interactive=True, input_fn=input_fn)
    assert state.n_records == 5 and len(asked) == 2
    assert not list(run.datasets.glob("superseded_*"))         # nothing was moved aside


def test_an_empty_emergency_save_is_not_offered(tmp_path):
    run, cfg, cp, _ = make(tmp_path)
    empty = cp.save(BuildState(), "emergency")                 # interrupted before the first batch finished
    assert read_state(empty)[0].n_records == 0
    assert cp.find_latest() is None

    def never(question):
        raise AssertionError(f"asked {question!r} about a save of 0 records")

    state = decide_resume(cp, CheckpointConfig(resume="ask"), interactive=True, input_fn=never)
    assert state.n_records == 0 and not state.done_batches
    # a save with records is offered even when an empty one came later
    full = cp.save(state_with(3, [0]), "checkpoint")
    Checkpointer(run, cfg, Config().to_dict(), 0, 9).save(BuildState(), "emergency")   # another session
    assert cp.find_latest() == full
    input_fn, asked = _answers("y")
    assert decide_resume(cp, CheckpointConfig(resume="ask"), interactive=True, input_fn=input_fn).n_records == 3
    assert "with 3 processed records" in asked[0]
