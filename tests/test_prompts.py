from dataclasses import dataclass

import pytest

from pva_sae.data import load_tasks
from pva_sae.prompts import PromptError, build_prompt, format_tests


@dataclass
class T:
    text: str
    test_list: tuple
    task_id: int = 0


def test_exact_prompt_for_task_2():
    task = next(t for t in load_tasks() if t.task_id == 2)
    assert build_prompt(task) == (
        "Write a function to find the similar elements from the given two tuple lists.\n"
        "\n"
        "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)\n"
        "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)\n"
        "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)\n"
        "\n"
        "# Solution:")


def test_every_packaged_prompt_is_well_formed():
    for task in load_tasks():
        prompt = build_prompt(task)
        assert "assert assert" not in prompt
        assert prompt.count("\nassert ") == 3
        assert prompt.endswith("\n\n# Solution:")


def test_custom_template_and_initiator():
    task = T(" Add one. \r\n", ("assert f(1) == 2",))
    assert build_prompt(task, "{text}\n{tests}\n{initiator}\n", "# Your code here") == \
        "Add one.\nassert f(1) == 2\n# Your code here\n"


@pytest.mark.parametrize("tests, fragment", [
    (("assert assert f(1) == 2",), "doubled"),
    (("f(1) == 2",), "not an assert"),
    ((), "at least one"),
])
def test_malformed_tests_are_refused(tests, fragment):
    with pytest.raises(PromptError, match=fragment):
        format_tests(tests)


def test_bad_templates_and_text():
    with pytest.raises(PromptError, match="lacks"):
        build_prompt(T("x", ("assert 1",)), "{text}{tests}")
    with pytest.raises(PromptError, match="unknown"):
        build_prompt(T("x", ("assert 1",)), "{text}{tests}{initiator}{code}")
    with pytest.raises(PromptError, match="empty description"):
        build_prompt(T("  ", ("assert 1",)))
