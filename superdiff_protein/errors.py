"""The base class of errors meant for the user: bad input or environment.

Library code and models raise subclasses of :class:`UserError` (``TrainError``, ``DatasetError``, ...); the
command lines (``superdiff_protein.cli.common``) turn them into one line on stderr and exit code 2. It lives here,
not in ``cli.common``, so that ``models`` can raise it without importing a command-line module.
"""
from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """An error whose message is meant for the user: bad input or environment (exit code 2).

    Subclasses may set ``exit_code`` (``GenerationFailed`` uses 1: the input was fine, sampling failed).
    """

    exit_code = 2
