"""The prompt: problem description + the three test asserts + a code initiator.

Default template (``config.DEFAULT_TEMPLATE``): ``{text}\\n\\n{tests}\\n\\n{initiator}`` with the
initiator ``# Solution:``. The description is stripped; each test is stripped and must already be an
``assert`` statement: it is never prefixed again, so a doubled ``assert assert`` cannot arise.
"""

from __future__ import annotations

import string
from typing import Sequence

from .config import DEFAULT_TEMPLATE

PLACEHOLDERS = {"text", "tests", "initiator"}


class PromptError(ValueError):
    """A prompt cannot be built as asked; the message says what is wrong."""


def format_tests(test_list: Sequence[str]) -> str:
    """The test asserts, one per line, exactly as given (stripped)."""
    lines = [t.strip() for t in test_list]
    if not lines:
        raise PromptError("a prompt needs at least one test assert")
    for line in lines:
        if not line.startswith("assert"):
            raise PromptError(f"test {line!r} is not an assert statement")
        if line.split()[1:2] == ["assert"]:
            raise PromptError(f"test {line!r} has a doubled 'assert'")
    return "\n".join(lines)


def check_template(template: str) -> None:
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    unknown = fields - PLACEHOLDERS
    if unknown:
        raise PromptError(f"prompt template has unknown placeholder(s) {sorted(unknown)}; allowed: {sorted(PLACEHOLDERS)}")
    missing = PLACEHOLDERS - fields
    if missing:
        raise PromptError(f"prompt template lacks placeholder(s) {sorted(missing)}")


def build_prompt(task, template: str = DEFAULT_TEMPLATE, initiator: str = "# Solution:") -> str:
    """The prompt for ``task`` (anything with ``text`` and ``test_list``)."""
    check_template(template)
    text = task.text.strip()
    if not text:
        raise PromptError(f"task {getattr(task, 'task_id', '?')} has an empty description")
    return template.format(text=text, tests=format_tests(task.test_list), initiator=initiator)
