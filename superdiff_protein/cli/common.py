"""The exit-code contract shared by every command line of the package (not for library use).

Every entry point (``generate_backbones``, ``evaluate_backbones``, ``prepare_dataset``,
``train_frame_model``, ``generate_images``, ``train_image_model``) runs its body through :func:`guard`,
by way of one of two wrappers: :func:`run_hydra` (a Hydra app: Hydra's ``--help``, ``--cfg``, ``-m``) or
:func:`run_command` (own ``--help`` text and subcommands; the config is composed with :func:`compose_config`,
Hydra's compose API), so they all behave the same:

* ``0``: done;
* ``1``: the run itself failed (NaN during sampling; an unexpected error, shown with its traceback:
  that is a bug to report);
* ``2``: bad input: one line ``<prog>: error: <what, and how to fix it>`` on stderr, no traceback,
  and nothing written (checks run before the first file is created; outputs are written atomically);
* ``130``: interrupted (Ctrl-C / SIGTERM).

"Bad input" is any :class:`UserError` (every module's error class derives from it: ``GenerateError``,
``DatasetError``, ``TrainError``, ``EvalError``, ``ImageCLIError``, ``ImageModelError``), the safe
loader's ``CheckpointError``, and Hydra / OmegaConf errors from the command line (unknown keys,
unparsable values, unknown presets). Messages are folded onto one line.
"""
from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..errors import UserError  # defined there so that models can raise it without importing a command line
from ..runs.checks import check_out_dir, resolve_device  # re-exported: the checks live with the run files

__all__ = ["UserError", "EXIT_OK", "EXIT_FAILED", "EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "one_line",
           "is_user_error", "error_line", "report", "guard", "check_out_dir", "resolve_device",
           "hydra_error_line", "run_hydra", "config_keys", "rename_deprecated", "compose_config",
           "reject_flags", "run_command"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


# ------------------------------------------------------------------------------------------ messages
def one_line(text: Any) -> str:
    """``text`` with every run of whitespace (newlines included) folded into one space."""
    return " ".join(str(text).split())


def _external_user_errors() -> tuple[type, ...]:
    """Error types of other packages that mean bad input (imported lazily; absent ones are skipped)."""
    out: list[type] = []
    try:
        from ..frames.checkpoints import CheckpointError

        out.append(CheckpointError)
    except Exception:  # pragma: no cover - a broken checkpoints module must not hide the real error
        pass
    try:
        from hydra.errors import HydraException

        out.append(HydraException)
    except ImportError:  # pragma: no cover
        pass
    try:
        from omegaconf.errors import OmegaConfBaseException

        out.append(OmegaConfBaseException)
    except ImportError:  # pragma: no cover
        pass
    return tuple(out)


def is_user_error(exc: BaseException) -> bool:
    """True for errors that mean bad input (see the module docstring)."""
    return isinstance(exc, UserError) or isinstance(exc, _external_user_errors())


def config_keys(config_name: str) -> dict:
    """The options of ``configs/<config_name>.yaml`` as a plain dict (without ``defaults`` and ``hydra``), for
    "unknown option" messages; empty when the file is absent or unreadable."""
    p = _CONFIG_DIR / f"{config_name}.yaml"
    try:
        from omegaconf import OmegaConf

        d = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
    except Exception:
        return {}
    if not isinstance(d, dict):
        return {}
    out = {k: v for k, v in d.items() if k not in ("defaults", "hydra")}
    for entry in d.get("defaults") or []:         # config groups (train_frame_model's model=small)
        if isinstance(entry, dict):
            for g in entry:
                if not str(g).startswith(("override ", "hydra")) and "/" not in str(g):
                    out.setdefault(str(g), {})
    return out


def _unknown_key_line(key: str, valid: Mapping[str, Any] | Sequence[str]) -> str:
    parts = key.lstrip("+~").split(".")
    node: Any = valid
    for p in parts[:-1]:                      # the section that lacks the last part
        node = node.get(p) if isinstance(node, Mapping) else None
    names = list(node) if isinstance(node, (Mapping, list, tuple)) else []
    msg = f"unknown option {key!r}"
    if names and parts[-1] not in names:
        close = difflib.get_close_matches(parts[-1], [str(n) for n in names], n=1)
        if close:
            msg += f" (did you mean {'.'.join(parts[:-1] + [close[0]])!r}?)"
        where = f"under {'.'.join(parts[:-1])}" if len(parts) > 1 else "options"
        msg += f"; valid {where}: {', '.join(map(str, names))}"
    return msg


def hydra_error_line(exc: BaseException, valid: Mapping[str, Any] | Sequence[str] = ()) -> str:
    """One readable line for a Hydra / OmegaConf command-line error (unknown key, bad value, ...)."""
    msg = str(exc)
    cause = exc.__cause__
    cause_msg = str(cause) if cause is not None else ""
    m = re.search(r"Missing mandatory value: ?(\S+)", msg)
    if m:
        return f"{m.group(1)} is required ({m.group(1)}=...; see --help)"
    m = re.search(r"Could not override '([^']+)'", msg)
    if m and ("not in struct" in cause_msg or "No match in the defaults list" in msg
              or re.search(r"Key '[^']+' not in '", cause_msg)):          # a structured config's schema
        return _unknown_key_line(m.group(1), valid)
    m = re.search(r"Ambiguous value for argument '([^'=]+)=([^']*)'", msg)
    if m:
        k, v = m.groups()
        return (f"{k}={v}: a comma-separated value is ambiguous here; write {k}=[{v}] for a list, "
                f"{k}='{v}' for a text, or add --multirun to sweep over it")
    m = re.search(r"Could not find '([^']+)/([^']+)'", msg)
    if m and getattr(exc, "options", None) is not None:
        group, name = m.groups()
        return f"{group}={name}: no such {group} config; available: {', '.join(exc.options) or '(none)'}"
    if type(exc).__name__ == "OverrideParseException":
        lines = [ln.strip() for ln in msg.splitlines() if ln.strip() and not ln.strip().startswith("See http")]
        return (f"cannot parse {getattr(exc, 'override', '')!r}: {one_line('; '.join(lines))} "
                "(write lists as key=[a,b] and quote texts with spaces or commas: 'key=a b')")
    if cause is not None and cause_msg and cause_msg not in msg:
        first = cause_msg.splitlines()[0]
        return one_line(f"{msg} ({first})")
    lines = [ln for ln in msg.splitlines() if ln.strip() and not ln.strip().startswith(("full_key:", "object_type="))]
    return one_line(" ".join(lines)) or type(exc).__name__


def error_line(exc: BaseException, valid: Mapping[str, Any] | Sequence[str] = ()) -> str:
    """The one-line message of a user error."""
    names = {c.__module__.split(".")[0] for c in type(exc).__mro__}
    if names & {"hydra", "omegaconf"} and not isinstance(exc, UserError):
        return hydra_error_line(exc, valid)
    text = one_line(exc)
    return text or type(exc).__name__


def report(prog: str, exc: BaseException, valid: Mapping[str, Any] | Sequence[str] = ()) -> int:
    """Print ``<prog>: error: <one line>`` on stderr; return the exit code (2 unless the error says otherwise)."""
    print(f"{prog}: error: {error_line(exc, valid)}", file=sys.stderr, flush=True)
    return int(getattr(exc, "exit_code", EXIT_BAD_INPUT))


def guard(prog: str, fn: Callable[[], Any], *, valid: Mapping[str, Any] | Sequence[str] = (),
          interrupted: str = "interrupted") -> int:
    """Run ``fn()`` under the exit-code contract; returns the exit code (``fn``'s own int result, else 0).

    User errors print one line and give their exit code (2); Ctrl-C prints ``interrupted`` and gives 130;
    anything else propagates (a bug: its traceback is the report).
    """
    try:
        rc = fn()
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - filtered just below
        if is_user_error(e):
            return report(prog, e, valid)
        raise
    return rc if isinstance(rc, int) and not isinstance(rc, bool) else EXIT_OK


# ------------------------------------------------------------------------------------------ Hydra
class _ArgError(Exception):
    pass


def _split_top_level(value: str) -> list[str]:
    """``value`` split at commas outside brackets and quotes (one part when there is no such comma)."""
    parts, depth, quote, cur = [], 0, "", ""
    for ch in value:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    parts.append(cur)
    return parts


def _rewrite_lists(overrides: Iterable[str], list_keys: Sequence[str]) -> list[str]:
    """``key=a,b,c`` -> ``key=[a,b,c]`` for the list-valued ``list_keys`` (Hydra would read a sweep)."""
    out = []
    for o in overrides:
        key, sep, val = o.partition("=")
        if sep and key.lstrip("+") in list_keys and val and val[0] not in "[{'\"" \
                and len(_split_top_level(val)) > 1:
            o = f"{key}=[{val}]"
        out.append(o)
    return out


def rename_deprecated(prog: str, overrides: Sequence[str], renamed: Mapping[str, str]) -> list[str]:
    """``overrides`` with each deprecated key of ``renamed`` (old -> new) spelled the new way (``+``, ``++``, ``~``
    prefixes kept); prints one ``<prog>: warning: ...`` line on stderr per old key used. Raises
    :class:`UserError` (exit code 2) when an option is given in both spellings."""
    out, used, seen = [], {}, set()
    for o in overrides:
        key, sep, val = o.partition("=")
        bare = key.lstrip("+~")
        prefix = key[:len(key) - len(bare)]
        seen.add(bare)
        if bare in renamed:
            used.setdefault(bare, renamed[bare])
            o = f"{prefix}{renamed[bare]}{sep}{val}"
        out.append(o)
    for old, new in used.items():
        if new in seen:
            raise _BothSpellings(f"{old}= and {new}= name the same option ({old} is the deprecated spelling of "
                                 f"{new}); give {new}= only")
    for old, new in used.items():
        print(f"{prog}: warning: {old}= is deprecated and will be removed in the next release; use {new}= "
              "(same meaning)", file=sys.stderr, flush=True)
    return out


class _BothSpellings(ValueError, UserError):
    pass


def _parse_hydra_args(argv: list[str]):
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def _error(message: str) -> None:
        raise _ArgError(message)

    parser.error = _error  # type: ignore[method-assign]
    return parser.parse_args(argv)


def run_hydra(prog: str, config_name: str, body: Callable[[Any], Any], *, argv: Sequence[str] | None = None,
              list_keys: Sequence[str] = (), node: Any = None, interrupted: str = "interrupted",
              valid: Mapping[str, Any] | None = None, renamed: Mapping[str, str] | None = None) -> int:
    """Run ``body(cfg)`` as a Hydra app (``@hydra.main``: ``--help``, ``--cfg``, ``-m`` and launchers keep
    working) under the exit-code contract; returns the exit code.

    Hydra's own errors (unknown keys, unparsable overrides, unknown presets, bad flags) become one line and
    exit code 2 instead of Hydra's multi-line report with exit code 1. Outside ``--multirun``,
    ``key=a,b`` for a key of ``list_keys`` means the list ``[a,b]``. ``node`` is a structured config stored
    under ``config_name`` when ``configs/<config_name>.yaml`` is absent; ``interrupted`` is the Ctrl-C line.
    ``valid``: the options named in "unknown option" messages (default: the keys of the YAML, :func:`config_keys`).
    ``renamed``: deprecated option names -> their new names (:func:`rename_deprecated`: one warning line each;
    both spellings at once is bad input).
    """
    import hydra

    args = list(sys.argv[1:] if argv is None else argv)
    valid = config_keys(config_name) if valid is None else valid
    try:
        parsed = _parse_hydra_args(args)
    except _ArgError as e:
        print(f"{prog}: error: {one_line(e)} (options are key=value; see {prog} --help)", file=sys.stderr)
        return EXIT_BAD_INPUT
    if renamed:
        try:
            new = rename_deprecated(prog, parsed.overrides, renamed)
        except UserError as e:
            return report(prog, e, valid)
        k = 0
        for i, a in enumerate(args):           # replace the overrides in place, keep the flags
            if k < len(parsed.overrides) and a == parsed.overrides[k]:
                args[i] = new[k]
                k += 1
        parsed.overrides = new
    if not parsed.multirun and list_keys:
        rewritten = _rewrite_lists(parsed.overrides, list_keys)
        if rewritten != parsed.overrides:
            k = 0
            for i, a in enumerate(args):       # replace the overrides in place, keep the flags
                if k < len(parsed.overrides) and a == parsed.overrides[k]:
                    args[i] = rewritten[k]
                    k += 1
    config_path = str(_CONFIG_DIR) if (_CONFIG_DIR / f"{config_name}.yaml").is_file() else None
    if config_path is None and node is not None:
        from hydra.core.config_store import ConfigStore

        ConfigStore.instance().store(name=config_name, node=node)
    rc = {"code": EXIT_OK}

    @hydra.main(config_path=config_path, config_name=config_name, version_base=None)
    def _app(cfg) -> None:
        rc["code"] = guard(prog, lambda: body(cfg), valid=valid, interrupted=interrupted)

    saved_argv, saved_env = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [prog, *args]
    os.environ["HYDRA_FULL_ERROR"] = "1"          # Hydra re-raises; we report it in one line
    try:
        _app()
    except Exception as e:  # noqa: BLE001 - filtered just below
        if is_user_error(e):
            return report(prog, e, valid)
        raise
    finally:
        sys.argv = saved_argv
        if saved_env is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_env
    return rc["code"]



# ------------------------------------------------------------------------------------------ compose API
_HELP_FLAGS = ("-h", "--help")


def compose_config(config_name: str, overrides: Sequence[str] = (), *, config_dir: str | os.PathLike | None = None,
                   error: Callable[[str], BaseException] = UserError, valid: Mapping[str, Any] | None = None,
                   as_dict: bool = False) -> Any:
    """``<config_dir>/<config_name>.yaml`` (default: ``configs/``) composed with the ``key=value`` overrides by
    Hydra's compose API (group selection ``model=tiny``, ``+key=value`` for a new key).

    A Hydra / OmegaConf error (unknown key or group, unparsable override) becomes ``error(<one line>)``
    (:func:`hydra_error_line`; ``valid`` as there, default :func:`config_keys`). ``as_dict``: return a plain
    dict, resolved and without the ``hydra`` node, instead of the ``DictConfig`` (resolution errors are
    reported the same way). Reads the config files only: no side effects.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    cdir = Path(config_dir) if config_dir is not None else _CONFIG_DIR
    try:
        with initialize_config_dir(config_dir=str(cdir.resolve()), version_base=None):
            cfg = compose(config_name=config_name, overrides=list(overrides))
        if not as_dict:
            return cfg
        d = OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise error(hydra_error_line(e, config_keys(config_name) if valid is None else valid)) from e
    except YAMLError as e:   # a config file that is not YAML (one of ours edited badly, or a user's group file)
        raise error(f"config file is not valid YAML: {' '.join(str(e).split())}") from e
    d.pop("hydra", None)
    return d


def reject_flags(prog: str, args: Iterable[str], *, error: Callable[[str], BaseException] = UserError,
                 allowed: Sequence[str] = ()) -> None:
    """Raise ``error`` naming the ``-flags`` of ``args`` other than ``allowed`` (options are ``key=value``)."""
    bad = [a for a in args if a.startswith("-") and a not in allowed]
    if bad:
        raise error(f"unknown flag(s) {' '.join(bad)}; options are key=value (see {prog} --help)")


def run_command(prog: str, body: Callable[[list[str]], Any], *, argv: Sequence[str] | None = None,
                usage: str | Callable[[], str], subcommands: Mapping[str, Callable[[list[str]], Any]] | None = None,
                flags: Sequence[str] = (), error: Callable[[str], BaseException] = UserError,
                interrupted: str = "interrupted") -> int:
    """Run a command line that composes its config itself (:func:`compose_config`) under the exit-code
    contract (:func:`guard`); returns the exit code.

    In order: ``-h`` / ``--help`` prints ``usage`` (a text, or a function returning it) and gives 0 -- as the
    first argument when the command has ``subcommands``, anywhere otherwise; a first argument naming one of
    ``subcommands`` runs it with the remaining arguments; any ``-flag`` other than ``flags`` is bad input
    (``error``, :func:`reject_flags`); then ``body(args)``.
    """
    args = list(sys.argv[1:] if argv is None else argv)

    def run() -> Any:
        if (args and args[0] in _HELP_FLAGS) or (not subcommands and any(a in _HELP_FLAGS for a in args)):
            print(usage() if callable(usage) else usage)
            return EXIT_OK
        if subcommands and args and args[0] in subcommands:
            return subcommands[args[0]](args[1:])
        reject_flags(prog, args, error=error, allowed=flags)
        return body(args)

    return guard(prog, run, interrupted=interrupted)
