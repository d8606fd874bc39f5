"""User-facing errors: one line saying what is wrong and what to do.

Library code raises :class:`SurgeryError` (or a subclass) for bad input; the CLI
prints ``error: <message> (hint: <fix>)`` and exits with status 2. Programming
errors stay ordinary exceptions with tracebacks.
"""

from __future__ import annotations


class SurgeryError(Exception):
    """Bad user input or an unusable artifact.

    Args:
        message: What is wrong, naming the bad value.
        hint: What the user should do about it.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class ConfigError(SurgeryError):
    """A configuration with one or more invalid fields; all violations are listed at once."""

    def __init__(self, problems: list[str], hint: str | None = None):
        self.problems = list(problems)
        super().__init__("invalid config: " + "; ".join(self.problems), hint)


class AlignmentMismatchError(SurgeryError):
    """A saved alignment was loaded against tokenizers it was not built for."""
