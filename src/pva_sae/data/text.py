"""Small text helpers shared by data loading, prompts and extraction (one copy of each)."""

from __future__ import annotations

import ast
import warnings


def unix_newlines(text: str) -> str:
    """CRLF and lone CR -> LF (MBPP's reference code and some completions mix them)."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def parse_quietly(source: str) -> ast.Module | None:
    """``ast.parse`` without SyntaxWarnings (invalid escapes are common in MBPP); None when it does not parse."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ast.parse(source)
    except (SyntaxError, ValueError):
        return None


def is_single_assert(test: str) -> bool:
    """Whether ``test`` is exactly one ``assert`` statement."""
    tree = parse_quietly(test.strip())
    return tree is not None and len(tree.body) == 1 and isinstance(tree.body[0], ast.Assert)
