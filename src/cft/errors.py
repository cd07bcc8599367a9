"""The errors cft reports as one line, without a traceback: ``cft.cli`` handles them in one place.

``CftError`` is the base: the CLI prints ``cft COMMAND: error: <first line>`` and exits with the class's
``exit_code``. ``UserError`` is every error a person fixes by changing an option, an input file or a
config (exit code 2, like a bad command line); the other ``CftError``s are runs that stopped for a reason
the person cannot fix by retyping the command (a failed download, a diverged training run: exit code 1).
Each class also keeps the built-in base its callers catch (``InputError`` is a ``ValueError``,
``MissingExtra`` an ``OSError``).
"""

from __future__ import annotations


class CftError(Exception):
    """An error the CLI prints as one line (``CFT_TRACEBACK=1``: the traceback instead)."""

    exit_code = 1


class UserError(CftError):
    """Something a person can fix: an option, an input file, a config. The CLI exits with code 2."""

    exit_code = 2


class UsageError(UserError, ValueError):
    """A configuration a person can fix (a bad combination of options, an unknown method)."""
