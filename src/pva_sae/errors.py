"""The project's error types: the CLI reports these as a one-line message and exits with status 2.

Anything else (a bug) keeps its traceback. Each subclass also derives from the builtin exception a
caller would expect (``ValueError`` for bad values, ``FileNotFoundError`` for a missing input), so
``except ValueError`` in user code keeps working.
"""

from __future__ import annotations


class PvaSaeError(Exception):
    """Base of every error the user can fix; the message names the problem and the fix."""


class InputError(PvaSaeError, ValueError):
    """An input (data, a run directory's contents, a choice of layers or tasks) cannot be used as asked."""


class MissingInputError(PvaSaeError, FileNotFoundError):
    """A file or an upstream stage's output that this step needs does not exist."""


class StaleInputError(PvaSaeError, ValueError):
    """An upstream artifact was made from other inputs than the ones now configured."""
