"""Read torch checkpoint files without ever running code from them.

``torch.load`` is a pickle reader, and a pickle can name any importable callable and call it.  This
module parses torch's two on-disk formats itself and unpickles **every** pickle in them (the
headers of the legacy format included) with one unpickler whose ``find_class`` resolves only an
allow-list of plain data types: containers, numbers, strings, tensors (rebuilt by our own strict
functions), dtypes, and OmegaConf config objects.  Nothing else can be imported or called, so a
payload fails before it runs.  It never calls ``torch.load``.

Formats:

* **zip** (torch >= 1.6 default): ``<archive>/data.pkl`` plus one raw record per storage
  (``<archive>/data/<key>``), little-endian.  TorchScript archives (which carry code) are refused.
* **legacy** (``_use_new_zipfile_serialization=False``): pickles of the magic number, protocol
  version and system info, the object pickle, the list of storage keys, then for each storage an
  int64 element count and its raw bytes.
* Anything else (a bare pickle, the pre-1.0 tar format, big-endian files) is refused.

The threat model is in ``docs/security.md``.
"""
from __future__ import annotations

import _compat_pickle
import codecs
import collections
import io
import os
import pickle
import struct
import typing
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["CheckpointError", "UnsafeCheckpointError", "safe_load", "safe_loads", "safe_unpickle", "pretrained_load_kwargs",
           "ALLOWED_GLOBAL_NAMES"]

_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001

CONVERT_HINT = (
    "if you made this file yourself, load it where you made it and re-save only tensors and plain data, "
    "e.g. torch.save({'model': model.state_dict(), 'conf': conf}, 'clean.pt'); see docs/security.md"
)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, unsafe or does not match the model."""


class UnsafeCheckpointError(CheckpointError):
    """The file asks for something outside the allow-list (it could run code): refused, nothing ran."""


# --------------------------------------------------------------------------------------------- allow-list
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexDoubleStorage": torch.complex128,
    "ComplexFloatStorage": torch.complex64, "UntypedStorage": torch.uint8,
}


class _StorageType:
    """What a pickled ``torch.FloatStorage`` (etc.) class reference resolves to: just its dtype."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _Storage:
    """A storage read from the file: untyped bytes plus the dtype its tensors view them as."""

    def __init__(self, data: torch.UntypedStorage, dtype: torch.dtype):
        self.data = data
        self.dtype = dtype


def _check_hooks(backward_hooks: Any) -> None:
    if backward_hooks:  # torch never saves hooks; a non-empty dict here is not a plain checkpoint
        raise UnsafeCheckpointError("a tensor in the file carries backward hooks (callables); refused")


def _rebuild_tensor(storage: Any, storage_offset: int, size: Any, stride: Any) -> torch.Tensor:
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"tensor record without a storage (got {type(storage).__name__})")
    try:
        t = torch.empty((0,), dtype=storage.dtype, device=storage.data.device)
        return t.set_(storage.data, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))
    except (RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"a tensor record does not fit its storage ({e})") from e


def _rebuild_tensor_v2(storage: Any, storage_offset: int, size: Any, stride: Any, requires_grad: bool = False,
                       backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    _check_hooks(backward_hooks)
    t = _rebuild_tensor(storage, storage_offset, size, stride)
    if requires_grad and t.is_floating_point():
        t.requires_grad_(True)
    return t


def _rebuild_parameter(data: Any, requires_grad: bool = True, backward_hooks: Any = None) -> torch.nn.Parameter:
    _check_hooks(backward_hooks)
    if not isinstance(data, torch.Tensor):
        raise CheckpointError("a Parameter record does not hold a tensor")
    return torch.nn.Parameter(data, bool(requires_grad))


def _rebuild_parameter_with_state(data: Any, requires_grad: bool, backward_hooks: Any, state: Any) -> torch.nn.Parameter:
    if state:
        raise UnsafeCheckpointError("a Parameter in the file carries extra Python state; refused")
    return _rebuild_parameter(data, requires_grad, backward_hooks)


_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_parameter, _rebuild_parameter_with_state)


_TENSOR, _PARAMETER = object(), object()


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """Tensor subclasses: only plain tensors and Parameters, rebuilt by our own functions, without state."""
    if func not in _REBUILDERS or new_type not in (_TENSOR, _PARAMETER) or state:
        raise UnsafeCheckpointError("a tensor of a custom subclass or with extra Python state; refused")
    out = func(*args)
    if new_type is _PARAMETER and not isinstance(out, torch.nn.Parameter):
        out = torch.nn.Parameter(out, out.requires_grad)
    return out


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Protocol-2 pickles spell ``bytes`` as ``_codecs.encode(str, 'latin1')``; only that codec is allowed."""
    if codecs.lookup(encoding).name != "iso8859-1" or not isinstance(text, str):
        raise UnsafeCheckpointError(f"_codecs.encode with codec {encoding!r}; only latin1 is allowed")
    return text.encode("latin1")


def _get_layout(name: str) -> torch.layout:
    layout = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(layout, torch.layout):
        raise UnsafeCheckpointError(f"unknown tensor layout {name!r}")
    return layout


def _omegaconf_globals() -> dict[str, Any]:
    try:
        from omegaconf import base, dictconfig, listconfig, nodes
    except ImportError:  # pragma: no cover - omegaconf is a hard dependency
        return {}
    out: dict[str, Any] = {
        "omegaconf.dictconfig.DictConfig": dictconfig.DictConfig,
        "omegaconf.listconfig.ListConfig": listconfig.ListConfig,
        "omegaconf.base.ContainerMetadata": base.ContainerMetadata,
        "omegaconf.base.Metadata": base.Metadata,
    }
    for name in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "BytesNode", "PathNode"):
        if hasattr(nodes, name):
            out[f"omegaconf.nodes.{name}"] = getattr(nodes, name)
    return out


def _build_allowed() -> dict[str, Any]:
    allowed: dict[str, Any] = {
        f"builtins.{t.__name__}": t
        for t in (dict, list, tuple, set, frozenset, int, float, complex, str, bytes, bytearray, bool, slice)
    }
    allowed.update({
        "collections.OrderedDict": collections.OrderedDict,
        "collections.defaultdict": collections.defaultdict,
        "typing.Any": typing.Any,
        "_codecs.encode": _latin1_encode,
        "torch._utils._rebuild_tensor": _rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter_with_state,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
        "torch.serialization._get_layout": _get_layout,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        # type markers only (not callable): _rebuild_from_type_v2 names the class it rebuilds
        "torch._tensor.Tensor": _TENSOR, "torch.Tensor": _TENSOR, "torch.nn.parameter.Parameter": _PARAMETER,
    })
    for name in dir(torch):  # dtypes, layouts and memory formats are plain values
        obj = getattr(torch, name, None)
        if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[f"torch.{name}"] = obj
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[f"torch.{name}"] = allowed[f"torch.cuda.{name}"] = _StorageType(dtype)
    allowed.update(_omegaconf_globals())
    return allowed


_ALLOWED: dict[str, Any] = _build_allowed()
#: Every ``module.name`` a checkpoint pickle may reference (documented in docs/security.md).
ALLOWED_GLOBAL_NAMES: tuple[str, ...] = tuple(sorted(_ALLOWED))


def _numpy_globals() -> dict[str, Any]:
    """What a pickled numpy array needs (plain-data pickles such as the CIFAR-10 archive)."""
    import numpy as np

    out: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[f"{mod}._reconstruct"] = np.ndarray.__reduce__(np.zeros(0))[0]
        out[f"{mod}.scalar"] = np.float64(0).__reduce__()[0]
    return out


class _Unpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; storages come from ``storage_loader``.

    Every way a pickle can reach a callable (GLOBAL, STACK_GLOBAL, INST, the EXT opcodes) goes
    through ``find_class``; REDUCE/NEWOBJ/BUILD can only use what it returned.
    """

    def __init__(self, f: io.BufferedIOBase, storage_loader: Callable[[tuple], Any] | None, allowed: bool = True,
                 table: dict[str, Any] | None = None, encoding: str = "utf-8"):
        super().__init__(f, encoding=encoding)
        self._storage_loader = storage_loader
        self._allow = allowed
        self._table = _ALLOWED if table is None else table

    def find_class(self, module: str, name: str) -> Any:
        # Python-2 spellings in protocol-2 pickles (``__builtin__.dict``), as pickle's own fix_imports;
        # the mapped name must still be on the allow-list
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if self._allow and full in self._table:
            return self._table[full]
        what = ("tensors, numbers, strings, lists/dicts, OmegaConf configs" if self._table is _ALLOWED
                else "numbers, strings, bytes, lists/dicts, numpy arrays")
        raise UnsafeCheckpointError(
            f"the file asks to import {full!r}, which is not on the allow-list ({what}); loading it could run "
            f"code, so it was refused and nothing ran" + (f"; {CONVERT_HINT}" if self._table is _ALLOWED else ""))

    def persistent_load(self, pid: Any) -> Any:
        if self._storage_loader is None:
            raise CheckpointError("unexpected storage reference in a header pickle")
        if not isinstance(pid, tuple) or not pid:
            raise CheckpointError(f"malformed storage reference {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module":
            raise UnsafeCheckpointError(f"the file pickles a whole nn.Module (with its source code); {CONVERT_HINT}")
        if kind != "storage":
            raise CheckpointError(f"unknown persistent record type {kind!r}")
        return self._storage_loader(pid[1:])


def _unpickle(f: io.BufferedIOBase, storage_loader: Callable[[tuple], Any] | None = None,
              allowed: bool = True) -> Any:
    return _Unpickler(f, storage_loader, allowed).load()


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _dtype_of(storage_type: Any) -> torch.dtype:
    if not isinstance(storage_type, _StorageType):
        raise CheckpointError(f"storage record of unknown type {storage_type!r}")
    return storage_type.dtype


def _storage_from_bytes(raw: bytes | bytearray, dtype: torch.dtype) -> _Storage:
    buf = bytearray(raw)
    data = torch.frombuffer(buf, dtype=torch.uint8).untyped_storage() if buf else torch.UntypedStorage(0)
    return _Storage(data, dtype)


# ----------------------------------------------------------------------------------------------- formats
def _load_zip(zf: zipfile.ZipFile, materialize: bool = True) -> Any:
    names = zf.namelist()
    pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise UnsafeCheckpointError("this is a TorchScript archive (it carries code), not a checkpoint; "
                                    f"{CONVERT_HINT}")
    if len(pkls) != 1:
        raise CheckpointError("not a torch checkpoint archive (expected exactly one <name>/data.pkl)")
    prefix = pkls[0][: -len("data.pkl")]
    order = prefix + "byteorder"
    if order in names and zf.read(order).strip() not in (b"little", b""):
        raise CheckpointError("big-endian checkpoint: re-save it on a little-endian machine")
    cache: dict[str, _Storage] = {}

    def load_storage(rec: tuple) -> _Storage:
        if len(rec) != 4:
            raise CheckpointError(f"malformed storage record {rec!r}")
        storage_type, key, _location, numel = rec
        dtype = _dtype_of(storage_type)
        key = str(key)
        if key not in cache:
            name = f"{prefix}data/{key}"
            try:
                info = zf.getinfo(name)
            except KeyError:
                raise CheckpointError(f"storage record {name} is missing (truncated file?)") from None
            nbytes = int(numel) * _element_size(dtype)
            if info.file_size != nbytes:  # checked before reading: no decompression bombs
                raise CheckpointError(f"storage {name} holds {info.file_size} bytes, its tensors need {nbytes}")
            cache[key] = (_storage_from_bytes(zf.read(name), dtype) if materialize
                          else _Storage(torch.UntypedStorage(nbytes, device="meta"), dtype))
        st = cache[key]
        return st if st.dtype == dtype else _Storage(st.data, dtype)

    with zf.open(pkls[0]) as f:
        return _unpickle(io.BufferedReader(f), load_storage)


def _load_legacy(f: io.BufferedIOBase, materialize: bool = True) -> Any:
    try:
        magic = _unpickle(f, allowed=False)
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"not a torch checkpoint: it is a pickle that asks to import code ({e})") from None
    if magic != _MAGIC_NUMBER:
        raise CheckpointError("not a torch checkpoint (no torch magic number; a plain pickle or another format)")
    if _unpickle(f, allowed=False) != _LEGACY_PROTOCOL_VERSION:
        raise CheckpointError("unsupported legacy torch protocol version")
    sys_info = _unpickle(f, allowed=False)
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise CheckpointError("big-endian checkpoint: re-save it on a little-endian machine")
    roots: dict[str, _Storage] = {}
    views: dict[str, _Storage] = {}

    def load_storage(rec: tuple) -> _Storage:
        if len(rec) != 5:
            raise CheckpointError(f"malformed storage record {rec!r}")
        storage_type, root_key, _location, numel, view = rec
        dtype = _dtype_of(storage_type)
        root_key = str(root_key)
        if root_key not in roots:
            nbytes = int(numel) * _element_size(dtype)
            roots[root_key] = _Storage(torch.UntypedStorage(nbytes, device="cpu" if materialize else "meta"), dtype)
        root = roots[root_key]
        if view is None:
            return root if root.dtype == dtype else _Storage(root.data, dtype)
        view_key, offset, size = view
        if str(view_key) not in views:
            es = _element_size(dtype)
            views[str(view_key)] = _Storage(root.data[int(offset) * es: (int(offset) + int(size)) * es], dtype)
        return views[str(view_key)]

    result = _unpickle(f, load_storage)
    keys = _unpickle(f, allowed=False)
    if not isinstance(keys, list):
        raise CheckpointError("malformed storage key list")
    for key in keys:
        root = roots.get(str(key))
        if root is None:
            raise CheckpointError(f"storage {key!r} is listed but never used")
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError("truncated file: storage data ends early")
        (numel,) = struct.unpack("<q", head)
        nbytes = numel * _element_size(root.dtype)
        if nbytes != root.data.nbytes():
            raise CheckpointError(f"storage {key!r} holds {nbytes} bytes, its tensors need {root.data.nbytes()}")
        if not materialize:
            f.seek(nbytes, io.SEEK_CUR)
            continue
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise CheckpointError("truncated file: storage data ends early")
        if nbytes:
            root.data.copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8).untyped_storage())
    return result


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict) and type(obj) in (dict, collections.OrderedDict):
        return type(obj)((k, _to_device(v, device)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _load_stream(f: Any, map_location: Any = "cpu", materialize: bool = True) -> Any:
    head = f.read(262)
    f.seek(0)
    if not head:
        raise CheckpointError("the file is empty")
    try:
        if head[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(f) as zf:
                obj = _load_zip(zf, materialize)
        elif head[257:262] == b"ustar":
            raise CheckpointError("torch's pre-1.0 tar checkpoint format is not supported; re-save it with torch >= 1.6")
        else:
            obj = _load_legacy(f, materialize)
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            struct.error, zipfile.BadZipFile, RuntimeError, OverflowError, MemoryError, UnicodeDecodeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"not a readable torch checkpoint (corrupt or truncated?): {type(e).__name__}: {msg}") from e
    if materialize and map_location not in (None, "cpu") and not callable(map_location):
        obj = _to_device(obj, torch.device(map_location))
    return obj


def safe_loads(data: bytes, map_location: Any = "cpu") -> Any:
    """Parse checkpoint bytes (zip or legacy torch format) with the allow-listed unpickler.

    Raises:
        UnsafeCheckpointError: the file references anything outside the allow-list (nothing ran).
        CheckpointError: the bytes are not a readable torch checkpoint.
    """
    return _load_stream(io.BytesIO(data), map_location)


def safe_load(path: str | os.PathLike, map_location: Any = "cpu", materialize: bool = True) -> Any:
    """Read a ``.pt/.pth/.ckpt`` file with the allow-listed unpickler; errors name the file.

    ``materialize=False`` only vets the file: every pickle is parsed, tensor data is not read (tensors
    come back on the ``meta`` device), so a multi-GB file costs no memory.
    """
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"{p} is a directory, not a checkpoint file")
    if not p.is_file():
        raise CheckpointError(f"checkpoint file not found: {p}")
    try:
        with open(p, "rb") as f:
            return _load_stream(f, map_location, materialize)
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{p}: refused: {e}") from None
    except CheckpointError as e:
        raise CheckpointError(f"{p}: {e}") from None
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read ({e.strerror or e})") from None


_PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def pretrained_load_kwargs(path: str | os.PathLike, subfolder: str | None = None) -> dict:
    """Make a Hugging Face ``from_pretrained`` (diffusers / transformers) load only vetted weights.

    Returns keyword arguments for ``from_pretrained``:

    * a hub id or a folder with ``*.safetensors`` weights: ``{"use_safetensors": True}`` (a format that
      cannot carry code; pickle weights are never read);
    * a local folder with only pickle weights (``pytorch_model.bin``, ``*.pt`` ...): each file is first
      parsed with the allow-listed unpickler, so what the library then reads is proven plain data; ``{}``.

    Raises:
        UnsafeCheckpointError / CheckpointError: a pickle weight file that is unsafe or unreadable.
    """
    folder = Path(path) / subfolder if subfolder else Path(path)
    if not folder.is_dir():
        return {"use_safetensors": True}
    if any(folder.glob("*.safetensors")):
        return {"use_safetensors": True}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix in _PICKLE_WEIGHT_SUFFIXES:
            safe_load(f, materialize=False)
    return {}


def safe_unpickle(data: bytes, encoding: str = "bytes") -> Any:
    """Unpickle plain data (containers, numbers, strings, bytes, numpy arrays) and nothing else.

    For data files in pickle format, such as the CIFAR-10 python archive.  No torch records.

    Raises:
        UnsafeCheckpointError: the pickle references anything else (nothing ran).
        CheckpointError: not a readable pickle.
    """
    table = {k: v for k, v in _ALLOWED.items() if k.startswith(("builtins.", "collections.", "_codecs."))}
    table.update(_numpy_globals())
    try:
        return _Unpickler(io.BytesIO(data), None, table=table, encoding=encoding).load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            struct.error, OverflowError, MemoryError, UnicodeDecodeError) as e:
        raise CheckpointError(f"not a readable pickle: {type(e).__name__}: {e}") from e
