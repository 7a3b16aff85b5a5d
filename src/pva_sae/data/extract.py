"""Extract the program from a model's completion (the generated new text only).

A base model writes a solution and then keeps going: test asserts, prints, a ``__main__`` block,
a new problem in prose, markdown fences, another ``# Solution:``. The program is what the sandbox
runs under the tests, so extraction keeps what defines things and drops what runs them:

1. The completion continues the prompt's last line. When that line is a comment (``# Solution:``)
   and the completion does not start on a new line, its first line belongs to the comment.
2. Markdown: the code before the first fence line, or else the first fenced block.
3. A line repeating the initiator after some code starts a new solution; it and what follows go.
4. The longest prefix of lines that parses is kept, so a statement cut off by the token limit
   (or prose that follows the code) is dropped whole; cuts fall only before unindented lines.
5. Top-level statements are kept up to the first that runs code: an ``assert``, a bare call such as
   ``print(...)`` or ``solve()``, ``if __name__ == ...``, a loop. Imports, functions, classes and
   constant assignments are kept; an assignment that calls a function defined in the completion
   (``result = solve(...)``) is kept only when a definition follows it, as is a module call such as
   ``sys.setrecursionlimit(...)``; an assignment that calls ``input()`` ends the program.
"""

from __future__ import annotations

import ast
import functools
import re
import textwrap
import warnings

from pva_sae.data.text import unix_newlines

DEFINITIONS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
               ast.Global, ast.Pass)
_ASSIGNMENTS = (ast.Assign, ast.AnnAssign, ast.AugAssign)
_DEFINITION_START = re.compile(r"^(?:def|async\s+def|class|import|from)\s|^@")
# Calls that read input or end the process: never part of a program run under tests.
_RUNTIME_CALLS = {"input", "print", "exit", "quit"}


@functools.lru_cache(maxsize=1 << 14)
def extract_program(completion: str, prompt_end: str = "# Solution:") -> str:
    """The program in ``completion``, trailing whitespace stripped; '' when it holds no usable code.

    ``prompt_end`` is the prompt the completion continues (or just its last line); the default is
    the default initiator. Remembered per (completion, prompt_end): a pure function of them, and steering
    reads the same completion (most steered ones equal their baseline's) tens of times.
    """
    last_line = unix_newlines(prompt_end).split("\n")[-1].strip()
    text = unix_newlines(completion)
    for candidate in _candidates(text, last_line):
        for segment in _fence_segments(candidate):
            program = _program(_cut_at_marker(segment, last_line))
            if program:
                return program
    return ""


def _candidates(text: str, last_line: str) -> list[str]:
    """The text to read, without the rest of a comment line the prompt ended in.

    If that finds nothing, the first line is also tried as code: a model may write ``def`` right
    after ``# Solution:`` on the same line.
    """
    if not last_line.startswith("#") or text.startswith("\n"):
        return [text]
    head, _, rest = text.partition("\n")
    return [rest, head.lstrip() + "\n" + rest] if head.strip() else [rest]


def _fence_segments(text: str) -> list[str]:
    """The text before the first markdown fence line, then the first fenced block."""
    lines = text.split("\n")
    fences = [i for i, line in enumerate(lines) if line.lstrip().startswith("```")]
    if not fences:
        return [text]
    first = fences[0]
    block_end = fences[1] if len(fences) > 1 else len(lines)
    return ["\n".join(lines[:first]), "\n".join(lines[first + 1:block_end])]


def _cut_at_marker(text: str, marker: str) -> str:
    """The text before the initiator's next appearance after some code (a new solution starts there).

    A repeat before any code (a model echoing ``# Solution:`` first) is kept: it is only a comment.
    """
    if not marker:
        return text
    lines = text.split("\n")
    seen_code = False
    for i, line in enumerate(lines):
        is_marker = line.strip().startswith(marker)
        if is_marker and seen_code:
            return "\n".join(lines[:i])
        seen_code = seen_code or (bool(line.strip()) and not is_marker)
    return text


def _program(segment: str) -> str:
    """The definitions at the start of ``segment``; leading prose before a definition is skipped."""
    lines = _without_leading_blank_lines(segment.split("\n"))
    if lines and lines[0][:1].isspace():  # code indented as a whole (dedent only then: it rewrites blank lines)
        lines = textwrap.dedent("\n".join(lines)).split("\n")
    program = _definitions(lines)
    if program:
        return program
    start = next((i for i, line in enumerate(lines) if i > 0 and _DEFINITION_START.match(line)), None)
    return "" if start is None else _definitions(lines[start:])


def _definitions(lines: list[str]) -> str:
    tree, lines = _longest_parseable_prefix(lines)
    if tree is None:
        return ""
    end = _end_of_definitions(tree.body)
    return "\n".join(lines[:end]).rstrip()


def _without_leading_blank_lines(lines: list[str]) -> list[str]:
    start = next((i for i, line in enumerate(lines) if line.strip()), len(lines))
    return lines[start:]


def _longest_parseable_prefix(lines: list[str]) -> tuple[ast.Module | None, list[str]]:
    """Longest prefix that parses, cut only before an unindented line (never inside a block)."""
    cuts = [n for n in range(len(lines), 0, -1)
            if n == len(lines) or (lines[n].strip() and not lines[n][:1].isspace())]
    for n in cuts:
        tree = _parse(lines[:n])
        if tree is not None and tree.body:
            return tree, lines[:n]
    return None, lines


def _parse(lines: list[str]) -> ast.Module | None:
    try:
        with warnings.catch_warnings():  # invalid escapes such as "\d" are fine to run
            warnings.simplefilter("ignore")
            return ast.parse("\n".join(lines))
    except (SyntaxError, ValueError, MemoryError, RecursionError):  # ValueError: null bytes
        return None


def _end_of_definitions(body: list[ast.stmt]) -> int:
    """Line number where the kept statements end (0 when none is kept)."""
    defined: set[str] = set()
    end = 0
    for node in body:
        kind = _kind(node, defined)
        if kind == "runs":
            break
        if kind == "defines":
            end = node.end_lineno or end
        defined.update(_names_defined(node))
    return end


def _kind(node: ast.stmt, defined: set[str]) -> str:
    """'defines' (keep), 'uses' (keep only if a definition follows) or 'runs' (stop here)."""
    if isinstance(node, DEFINITIONS):
        return "defines"
    if isinstance(node, _ASSIGNMENTS):
        return _assignment_kind(node, defined)
    if isinstance(node, ast.Expr):
        return _expression_kind(node.value, defined)
    if isinstance(node, (ast.If, ast.Try)) and not _is_main_guard(node):
        kinds = {_kind(child, defined) for child in _children(node)}
        return "defines" if kinds and kinds <= {"defines", "uses"} else "runs"
    return "runs"


def _assignment_kind(node: ast.Assign | ast.AnnAssign | ast.AugAssign, defined: set[str]) -> str:
    if isinstance(node, ast.AnnAssign) and node.value is None:
        return "runs"  # 'Output: 3' or 'Note: this is O(n)' is prose that happens to parse
    if _calls_any(node, _RUNTIME_CALLS):
        return "runs"
    return "uses" if _calls_any(node, defined) else "defines"


def _expression_kind(value: ast.expr, defined: set[str]) -> str:
    """A bare expression: a string is a stray docstring; ``sys.setrecursionlimit(...)`` sets things
    up; a call of a plain name (``print``, ``main``, the solution) or of the completion's own code
    runs it."""
    if isinstance(value, ast.Constant) and isinstance(value.value, str):
        return "uses"
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute):
        return "runs" if _calls_any(value, defined | _RUNTIME_CALLS) else "uses"
    return "runs"


def _children(node: ast.If | ast.Try) -> list[ast.stmt]:
    if isinstance(node, ast.If):
        return node.body + node.orelse
    handlers = [stmt for handler in node.handlers for stmt in handler.body]
    return node.body + handlers + node.orelse + node.finalbody


def _is_main_guard(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and any(isinstance(n, ast.Name) and n.id == "__name__" for n in ast.walk(node.test))


def _calls_any(tree: ast.AST, names: set[str]) -> bool:
    """Whether running ``tree`` calls one of ``names`` (calls inside lambdas do not run yet)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Lambda):
            continue
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names:
            return True
        stack.extend(ast.iter_child_nodes(node))
    return False


def _names_defined(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.If, ast.Try)):
        return {name for child in _children(node) for name in _names_defined(child)}
    return set()
