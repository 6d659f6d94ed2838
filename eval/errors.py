"""Exception types of the evaluation package (clear messages, no raw tracebacks from the CLI)."""
from __future__ import annotations

from superdiff_protein.errors import UserError


class EvalError(UserError):
    """Base class for evaluation errors whose message is meant for the user (exit code 2 in the CLI)."""


class BadInputError(EvalError):
    """Bad user input: missing directory, no structure files, unreadable reference, bad option."""


class StructureReadError(EvalError):
    """A structure file could not be read or holds no usable protein chain."""


class ModelUnavailableError(EvalError):
    """A model (ProteinMPNN / ESMFold) or its weights are not available; the message says how to get them."""
