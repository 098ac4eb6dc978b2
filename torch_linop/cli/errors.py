"""The one error type the command line turns into exit code 2 (bad usage), with its fix."""

from __future__ import annotations

USAGE_EXIT_CODE = 2


class UsageError(Exception):
    """Bad command-line input: an unknown option value, a missing module, a factory that returns
    the wrong thing. The message says what was wrong and how to fix it."""
