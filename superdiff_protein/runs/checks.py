"""Checks a run makes before it writes anything: the output directory (or file) and the device.

Shared by every command line (``superdiff_protein.cli``), by ``prepare_dataset``
(:mod:`superdiff_protein.frames.prepare`) and by ``evaluate_backbones`` (``eval``, which may import only
:mod:`superdiff_protein.runs`). Each check raises ``error`` (default :class:`~superdiff_protein.errors.UserError`)
with one line saying what is wrong; nothing is created.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import UserError

__all__ = ["check_out_dir", "resolve_device"]


def check_out_dir(path: Any, what: str = "out_dir", error: type[Exception] = UserError,
                  file_ok: bool = False) -> Path:
    """Check that the output directory ``path`` exists or can be created, without creating anything.

    Refuses an existing non-directory, a parent that is not a directory (``/dev/null/x``) and an unwritable
    place. ``file_ok=True`` checks an output *file* instead (its directory must be writable; an existing
    directory in its place is refused). Returns the expanded path.
    """
    if path is None or str(path).strip() in ("", "???"):
        raise error(f"{what}: an output {'file' if file_ok else 'directory'} is required")
    p = Path(os.path.expanduser(str(path)))
    if p.exists():
        if file_ok:
            if p.is_dir():
                raise error(f"{what}: {str(p)!r} is a directory; give a file name")
            target = p.parent
        else:
            if not p.is_dir():
                raise error(f"{what}: {str(p)!r} exists and is not a directory")
            target = p
    else:
        target = p.parent
    # nearest existing ancestor must be a writable directory
    anc = target if str(target) else Path(".")
    while not anc.exists():
        if anc.is_symlink():
            raise error(f"{what}: {str(anc)!r} is a dangling symbolic link")
        if anc.parent == anc:
            break
        anc = anc.parent
    if not anc.is_dir():
        raise error(f"{what}: cannot create {str(p)!r}: {str(anc)!r} is not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise error(f"{what}: cannot write to {str(anc)!r} (permission denied)")
    return p


def resolve_device(spec: Any, key: str = "device", error: type[Exception] = UserError):
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N`` as a ``torch.device``; refuses absent
    CUDA devices and other device types."""
    import torch

    s = str(spec).strip().lower()
    if s in ("auto", "", "none"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(s)
    except (RuntimeError, ValueError):
        raise error(f"{key}: unknown device {spec!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise error(f"{key}={spec}: CUDA was requested but no CUDA device is available "
                        "(torch.cuda.is_available() is False); use device=cpu or device=auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise error(f"{key}={spec}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type != "cpu":
        raise error(f"{key}: unsupported device type {dev.type!r} (use cpu or cuda)")
    return dev
