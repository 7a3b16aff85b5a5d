"""Extract the program from a model's completion (the generated new text only).

Syntax-aware: the completion is cut to its longest prefix of lines that parses (generation may stop
mid-statement), then its top-level statements are kept while they define things (imports, functions,
classes, assignments, docstrings/comments) and dropped from the first top-level test code onwards
(asserts, prints and other bare calls, ``if __name__ == ...``) or prose that does not parse.
"""

from __future__ import annotations

import ast
import re

_FENCE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S)
KEEP = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
        ast.AnnAssign, ast.AugAssign, ast.Global)


def extract_program(completion: str) -> str:
    """The program a completion contains, or '' when it holds no usable code."""
    text = completion.replace("\r\n", "\n").replace("\r", "\n")
    fenced = _FENCE.search(text)
    if fenced:
        text = fenced.group(1)
    lines = text.split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    tree, lines = _longest_parseable_prefix(lines)
    if tree is None:
        return ""
    end = 0
    for node in tree.body:
        if not _is_definition(node):
            break
        end = node.end_lineno
    return "\n".join(lines[:end]).rstrip()


def _longest_parseable_prefix(lines: list[str]) -> tuple[ast.Module | None, list[str]]:
    for n in range(len(lines), 0, -1):
        if n < len(lines) and lines[n].startswith((" ", "\t")) and lines[n].strip():
            continue  # never cut inside an indented block
        try:
            return ast.parse("\n".join(lines[:n])), lines[:n]
        except SyntaxError:
            continue
    return None, lines


def _is_definition(node: ast.stmt) -> bool:
    if isinstance(node, KEEP):
        return True
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
        return True  # a docstring-like string at top level
    if isinstance(node, (ast.If, ast.Try)) and not _is_main_guard(node):
        return all(_is_definition(child) for child in node.body)  # e.g. try: import x / except ImportError
    return False


def _is_main_guard(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "__name__" in ast.unparse(node.test)
