"""The prompt: problem description, the test asserts, and a code initiator.

Default template (``DEFAULT_TEMPLATE``) ``{text}\\n\\n{tests}\\n\\n{initiator}`` with the
initiator ``# Solution:``. Normalisation, pinned by the tests:

- the description has its line endings made ``\\n`` and surrounding whitespace stripped;
- each test is stripped (78 MBPP tests end in a space) and must already be one ``assert``
  statement. Tests are never prefixed with ``assert``, so ``assert assert`` cannot be produced, and
  a test that already reads that way is refused instead of passed on to the model;
- the template and the initiator are used exactly as given.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Any

from pva_sae.data.text import is_single_assert, unix_newlines
from pva_sae.errors import PvaSaeError

PLACEHOLDERS = ("text", "tests", "initiator")
# 'tests': the template above (description, asserts, initiator); 'signature': HumanEval's own prompt.
PROMPT_STYLES = ("tests", "signature")
DEFAULT_TEMPLATE = "{text}\n\n{tests}\n\n{initiator}"
_DOUBLED_ASSERT = re.compile(r"^assert\s*\(?\s*assert\b")


class PromptError(PvaSaeError, ValueError):
    """A prompt cannot be built as asked; the message says what is wrong and how to fix it."""


def format_tests(test_list: Sequence[str], allow_empty: bool = False) -> str:
    """The test asserts, stripped, one per line, in the given order ('' for none, if ``allow_empty``)."""
    if isinstance(test_list, str):
        raise PromptError("test_list must be a sequence of assert strings, not one string")
    tests = [test.strip() for test in test_list]
    if not tests and not allow_empty:
        raise PromptError("a prompt needs at least one test assert; the task's test_list is empty")
    for test in tests:
        _check_test(test)
    return "\n".join(tests)


def _check_test(test: str) -> None:
    if _DOUBLED_ASSERT.match(test):
        raise PromptError(f"test {test!r} has a doubled 'assert'; pass the asserts as they are in MBPP")
    if not test.startswith("assert"):
        raise PromptError(f"test {test!r} is not an assert statement; each test must start with 'assert'")
    if not is_single_assert(test):
        raise PromptError(f"test {test!r} is not one valid assert statement")


def check_template(template: str) -> None:
    """Raise PromptError unless ``template`` uses each of {text}, {tests}, {initiator} and nothing else."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise PromptError(f"prompt template {template!r} is not a valid format string ({exc}); "
                          "write literal braces as '{{' and '}}'") from None
    fields = [(name, conversion, spec) for _, name, spec, conversion in parts if name is not None]
    unknown = sorted({name for name, _, _ in fields} - set(PLACEHOLDERS))
    if unknown:
        raise PromptError(f"prompt template has unknown placeholder(s) {unknown}; the allowed ones are "
                          f"{{text}}, {{tests}} and {{initiator}} (write literal braces as '{{{{' and '}}}}')")
    if any(conversion or spec for _, conversion, spec in fields):
        raise PromptError(f"prompt template {template!r}: placeholders take no conversion or format spec")
    missing = [name for name in PLACEHOLDERS if name not in {n for n, _, _ in fields}]
    if missing:
        raise PromptError(f"prompt template {template!r} lacks placeholder(s) "
                          f"{', '.join('{' + m + '}' for m in missing)}")


def build_prompt(task: Any, template: str = DEFAULT_TEMPLATE, initiator: str = "# Solution:",
                 style: str = "tests") -> str:
    """The prompt for ``task`` (anything with ``text`` and ``test_list``, such as ``data.Task``).

    ``style='signature'`` is HumanEval's own prompt (imports, helpers, the signature and docstring; the
    model writes the body), used as it is: template and initiator do not apply. A HumanEval task whose
    docstring and ``check`` hold no example (``example_source == 'none'``) gets an empty tests section.
    """
    if style not in PROMPT_STYLES:
        raise PromptError(f"prompt style {style!r} is unknown; use one of {', '.join(PROMPT_STYLES)}")
    if style == "signature":
        if not isinstance(getattr(task, "prompt", None), str):
            raise PromptError(f"task {getattr(task, 'task_id', '?')} has no signature prompt: prompt.style="
                              "'signature' needs data.dataset='humaneval'")
        return unix_newlines(task.prompt)
    check_template(template)
    text = unix_newlines(task.text).strip()
    if not text:
        raise PromptError(f"task {getattr(task, 'task_id', '?')} has an empty description (text)")
    tests = format_tests(task.test_list, allow_empty=getattr(task, "example_source", None) == "none")
    return template.format(text=text, tests=tests, initiator=initiator)
