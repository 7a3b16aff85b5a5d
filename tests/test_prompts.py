from dataclasses import dataclass

import pytest

from pva_sae.data.mbpp import load_tasks
from pva_sae.data.prompts import DEFAULT_TEMPLATE, PromptError, build_prompt, check_template, format_tests


@dataclass
class FakeTask:
    text: str
    test_list: tuple
    task_id: int = 0


@pytest.fixture(scope="module")
def tasks():
    return {t.task_id: t for t in load_tasks()}


def test_exact_prompt_for_task_2(tasks):
    assert build_prompt(tasks[2]) == (
        "Write a function to find the similar elements from the given two tuple lists.\n"
        "\n"
        "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)\n"
        "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)\n"
        "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)\n"
        "\n"
        "# Solution:"
    )


def test_exact_prompt_for_task_4_strips_trailing_spaces_of_tests(tasks):
    assert tasks[4].test_list[0].endswith("[85, 75, 65] ")  # as in MBPP
    assert build_prompt(tasks[4]) == (
        "Write a function to find the largest integers from a given list of numbers using heap queue algorithm.\n"
        "\n"
        "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65]\n"
        "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75]\n"
        "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]\n"
        "\n"
        "# Solution:"
    )


def test_every_packaged_prompt_is_well_formed(tasks):
    for task in tasks.values():
        prompt = build_prompt(task)
        head, tests, initiator = prompt.split("\n\n")
        assert head == task.text.strip() and initiator == "# Solution:"
        assert tests.split("\n") == [t.strip() for t in task.test_list]
        assert "assert assert" not in prompt and not prompt.endswith((" ", "\n"))


def test_text_normalisation_and_custom_template():
    task = FakeTask(" Add one to\r\nevery {key}. \r\n", ("  assert f(1) == 2 ",))
    assert build_prompt(task, "{text}\n{tests}\n{initiator}\n", "# Your code here") == \
        "Add one to\nevery {key}.\nassert f(1) == 2\n# Your code here\n"
    assert build_prompt(task, "Q: {text} Tests: {tests} {{literal}} {initiator}", "") == \
        "Q: Add one to\nevery {key}. Tests: assert f(1) == 2 {literal} "


def test_default_template_is_the_configured_one():
    assert DEFAULT_TEMPLATE == "{text}\n\n{tests}\n\n{initiator}"
    check_template(DEFAULT_TEMPLATE)


@pytest.mark.parametrize("tests, fragment", [
    (("assert assert f(1) == 2",), "doubled 'assert'"),
    (("assert f(1) == 2", "assert  assert f(2) == 3"), "doubled 'assert'"),
    (("f(1) == 2",), "not an assert statement"),
    (("assertion_helper(1)",), "not one valid assert"),
    (("assert f(1) == 2; print(1)",), "not one valid assert"),
    (("assert f(1) ==",), "not one valid assert"),
    ((), "at least one test"),
    ("assert f(1) == 2", "not one string"),
])
def test_malformed_tests_are_refused(tests, fragment):
    with pytest.raises(PromptError, match=fragment):
        format_tests(tests)


@pytest.mark.parametrize("template, fragment", [
    ("{text}\n\n{tests}", r"lacks placeholder\(s\) \{initiator\}"),
    ("no placeholders at all", "lacks placeholder"),
    ("{text}{tests}{initiator}{code}", r"unknown placeholder\(s\) \['code'\]"),
    ("{}{text}{tests}{initiator}", "unknown placeholder"),
    ("{text!r}{tests}{initiator}", "no conversion or format spec"),
    ("{text:>10}{tests}{initiator}", "no conversion or format spec"),
    ("{text}{tests}{initiator", "not a valid format string"),
])
def test_bad_templates_are_refused(template, fragment):
    with pytest.raises(PromptError, match=fragment):
        build_prompt(FakeTask("x", ("assert True",)), template)


def test_empty_description_is_refused():
    with pytest.raises(PromptError, match="task 7 has an empty description"):
        build_prompt(FakeTask(" \r\n ", ("assert True",), task_id=7))
