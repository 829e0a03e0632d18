"""Where the clients' tensors are read from: in-memory tensors, or the ``.npy`` bytes of Flower ``Array``s.

A Flower ``Array`` (``stype == "numpy.ndarray"``) holds the bytes ``np.save`` wrote: a header (magic, version,
a Python-literal dict with ``descr``, ``fortran_order`` and ``shape``, padded so the data starts 64-byte
aligned) followed by the raw elements. :class:`RecordSource` parses each distinct header once (cached by its
bytes), checks every other client's header by a byte comparison, and hands the kernels each array's elements
where they are, inside the received ``bytes`` object: as a zero-copy byte view (copied by slice assignment)
or as an address (copied by ``memmove``, which runs without the GIL, when several threads work). Nothing is
deserialised array by array. Duck-typed: anything whose values have ``.data`` (bytes) and ``.stype`` works,
so this module never imports Flower.
"""

from __future__ import annotations

import ast
import ctypes
import math
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from devft.aggregation.errors import InvalidUpdateError, UnsupportedArrayError

NPY_STYPE = "numpy.ndarray"
_MAGIC = b"\x93NUMPY"
_NPY_DTYPES: dict[str, torch.dtype] = {
    "<f2": torch.float16,
    "<f4": torch.float32,
    "<f8": torch.float64,
    "|u1": torch.uint8,  # a packed payload's manifest (JSON bytes), never summed
}
NPY_FLOAT_DTYPES = (torch.float16, torch.float32, torch.float64)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ITEMSIZE = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 8}


# CPython keeps a bytes object's payload inline at a fixed offset from the object (``id``); checked once here
# against ctypes, with ctypes as the fallback anywhere that does not hold.
_BYTES_DATA_OFFSET = bytes.__basicsize__ - 1
_PROBE = b"devft-address-probe"
_ID_ADDRESS_OK = ctypes.cast(ctypes.c_char_p(_PROBE), ctypes.c_void_p).value == id(_PROBE) + _BYTES_DATA_OFFSET


def buffer_address(data: Any) -> int:
    """Address of the first byte of ``data`` (bytes, or any object exporting a buffer); caller keeps it alive."""
    if type(data) is bytes:
        if _ID_ADDRESS_OK:
            return id(data) + _BYTES_DATA_OFFSET
        return int(ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0)
    return int(np.frombuffer(data, dtype=np.uint8).ctypes.data)


@dataclass(frozen=True)
class NpyLayout:
    """Where the elements of one ``.npy`` buffer are and how to read them."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes before the first element
    fortran_order: bool
    header: bytes  # magic + version + length + dict, exactly as in the buffer
    numel: int = 0
    end: int = 0  # offset + numel · itemsize: the exact length of a well-formed buffer

    @staticmethod
    def make(dtype: torch.dtype, shape: tuple[int, ...], offset: int, fortran_order: bool, header: bytes) -> NpyLayout:
        numel = math.prod(shape)
        return NpyLayout(dtype, shape, offset, fortran_order, header, numel, offset + numel * dtype.itemsize)


class BoundedCache(OrderedDict):
    """A least-recently-used cache of at most ``entries`` items whose byte-string keys are at most
    ``key_bytes`` long: what a client sends cannot make the server hold more than ``entries · key_bytes``
    (a longer key is parsed every time and never kept)."""

    def __init__(self, entries: int, key_bytes: int) -> None:
        super().__init__()
        self.entries = entries
        self.key_bytes = key_bytes

    def lookup(self, key: bytes) -> Any:
        """The value kept for ``key`` (now the most recently used), or None."""
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def keep(self, key: bytes, value: Any) -> None:
        """Keep ``value`` under ``key`` if the key is short enough, evicting the least recently used."""
        if len(key) > self.key_bytes:
            return
        self[key] = value
        if len(self) > self.entries:
            self.popitem(last=False)


# np.save pads a header to a multiple of 64 bytes: a few hundred bytes for any LoRA tensor's shape
_HEADER_CACHE = BoundedCache(entries=4096, key_bytes=1024)


def parse_npy_header(data: bytes | memoryview, key: str = "?",
                     dtypes: tuple[torch.dtype, ...] = NPY_FLOAT_DTYPES) -> NpyLayout:
    """Parse the header of ``.npy`` bytes (cached by the header's bytes); raise for what we cannot read, and
    for an array whose dtype is not one of ``dtypes`` (the float dtypes aggregation reads, by default)."""
    if bytes(data[:6]) != _MAGIC:
        raise UnsupportedArrayError(f"array {key!r} is not .npy bytes (magic {bytes(data[:6])!r})")
    if len(data) < 10:
        raise UnsupportedArrayError(f"array {key!r} holds {len(data)} bytes, too few for a .npy header")
    major = data[6]
    if major == 1:
        start = 10
        hlen = int.from_bytes(data[8:10], "little")
    elif major in (2, 3):
        start = 12
        hlen = int.from_bytes(data[8:12], "little")
    else:
        raise UnsupportedArrayError(f"array {key!r} has .npy format version {major}, expected 1, 2 or 3")
    if len(data) < start + hlen:
        raise UnsupportedArrayError(f"array {key!r} holds {len(data)} bytes, fewer than its .npy header's "
                                    f"{start + hlen}")
    header = bytes(data[: start + hlen])
    layout = _HEADER_CACHE.lookup(header)
    if layout is None:
        layout = _parse_header_dict(header, start, major, key)
        _HEADER_CACHE.keep(header, layout)
    if layout.dtype not in dtypes:
        names = [str(d).removeprefix("torch.") for d in dtypes]
        raise UnsupportedArrayError(f"array {key!r} has dtype {str(layout.dtype).removeprefix('torch.')}; "
                                    f"expected one of {names} (little-endian)")
    if len(data) < layout.end:  # checked for every buffer: a cached header says nothing of this one's length
        raise UnsupportedArrayError(f"array {key!r} holds {len(data)} bytes, fewer than its header promises "
                                    f"({layout.end})")
    return layout


def _parse_header_dict(header: bytes, start: int, major: int, key: str) -> NpyLayout:
    """The layout a ``.npy`` header's dict describes; anything malformed is an :class:`UnsupportedArrayError`."""
    text = header[start:].decode("utf-8" if major == 3 else "latin1", errors="replace")
    shown = text if len(text) <= 200 else text[:200] + f"… ({len(text)} characters)"  # a client wrote it
    malformed = UnsupportedArrayError(f"array {key!r} has a malformed .npy header {shown!r}")
    try:
        meta = ast.literal_eval(text)  # a dict of literals, never code
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as err:
        raise malformed from err
    if not isinstance(meta, dict) or not {"descr", "fortran_order", "shape"} <= set(meta):
        raise malformed
    shape, fortran_order, descr = meta["shape"], meta["fortran_order"], meta["descr"]
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape) \
            or not isinstance(fortran_order, bool):
        raise malformed
    try:
        dtype_str = np.dtype(descr).str if isinstance(descr, str) else None
    except TypeError:
        dtype_str = None
    if dtype_str not in _NPY_DTYPES:
        raise UnsupportedArrayError(
            f"array {key!r} has dtype {repr(descr)[:100]}; aggregation reads little-endian float16/32/64 only"
            " (and uint8 for a packed manifest)"
        )
    return NpyLayout.make(_NPY_DTYPES[dtype_str], shape, len(header), fortran_order, header)  # data follows it


def npy_view(data: bytes, layout: NpyLayout) -> torch.Tensor:
    """A zero-copy, **read-only** tensor over the elements of ``data`` (never write into it)."""
    arr = np.frombuffer(data, dtype=np.dtype(str(layout.dtype).removeprefix("torch.")), count=layout.numel,
                        offset=layout.offset)
    arr = arr.reshape(layout.shape[::-1]).T if layout.fortran_order else arr.reshape(layout.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the given NumPy array is not writable"
        return torch.from_numpy(arr)


class TensorSource:
    """One client's update given as in-memory tensors ``{key: tensor}``."""

    kind = "tensors"

    def __init__(self, update: Mapping[str, torch.Tensor]) -> None:
        self._update = update
        self._flat: dict[str, torch.Tensor] = {}

    def keys(self) -> list[str]:
        return list(self._update.keys())

    def has(self, key: str) -> bool:
        return key in self._update

    def meta(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        t = self._update[key]
        return t.dtype, tuple(t.shape)

    def device(self, key: str) -> torch.device:
        return self._update[key].device

    def tensor(self, key: str) -> torch.Tensor:
        return self._update[key]

    def flat(self, key: str) -> torch.Tensor:
        f = self._flat.get(key)
        if f is None:
            f = self._flat[key] = self._update[key].detach().reshape(-1)
        return f

    def elements(self, keys: list[str], metas: list[tuple[torch.dtype, tuple[int, ...]]], client: int,
                 device: torch.device) -> list[torch.Tensor]:
        """The flat tensor of each key, after checking it has the expected dtype, shape and device."""
        out = []
        update = self._update
        for key, (dtype, shape) in zip(keys, metas):
            t = update.get(key)
            if t is None:
                raise InvalidUpdateError("missing", client=client, key=key)
            if t.dtype != dtype or tuple(t.shape) != shape or t.device != device:
                raise InvalidUpdateError(
                    f"{t.dtype}{tuple(t.shape)} on {t.device}, expected {dtype}{shape} on {device}",
                    client=client, key=key)
            out.append(self.flat(key))
        return out


class RecordSource:
    """One client's update given as a Flower ``ArrayRecord`` (or any ``{key: obj with .data bytes}``)."""

    kind = "npy-bytes"

    def __init__(self, record: Mapping[str, Any]) -> None:
        # one pass over items(): ArrayRecord.__getitem__ costs ~10 µs a call, iteration ~0.05 µs an item
        self._record: dict[str, Any] = dict(record.items())
        self._layouts: dict[str, NpyLayout] = {}
        self._c_copies: dict[str, np.ndarray] = {}  # C-order copies of Fortran-order arrays (rare)
        # the bytes objects whose addresses were handed out: an ``Array`` whose ``.data`` builds new bytes on
        # every read would otherwise free them before a kernel reads them
        self._addressed: dict[str, Any] = {}

    def keys(self) -> list[str]:
        return list(self._record.keys())

    def has(self, key: str) -> bool:
        return key in self._record

    def layout(self, key: str) -> NpyLayout:
        """The layout of ``key`` (parsed from its header once)."""
        lay = self._layouts.get(key)
        if lay is not None:
            return lay
        arr = self._record[key]
        stype = getattr(arr, "stype", None)
        if stype != NPY_STYPE:
            raise UnsupportedArrayError(f"array {key!r} has stype {stype!r}, expected {NPY_STYPE!r}")
        lay = parse_npy_header(arr.data, key)
        if lay.fortran_order:
            # np.save of a transposed array: re-serialise this one array in C order, once
            self._c_copies[key] = np.ascontiguousarray(npy_view(arr.data, lay).numpy())
            lay = NpyLayout.make(lay.dtype, lay.shape, 0, False, b"")
        self._layouts[key] = lay
        return lay

    def meta(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        lay = self.layout(key)
        return lay.dtype, lay.shape

    def device(self, key: str) -> torch.device:
        return torch.device("cpu")

    def tensor(self, key: str) -> torch.Tensor:
        """A zero-copy, read-only view of ``key`` (never write into it: it aliases the received bytes)."""
        lay = self.layout(key)
        if key in self._c_copies:
            return torch.from_numpy(self._c_copies[key])
        return npy_view(self._record[key].data, lay)

    def elements(self, keys: list[str], layouts: list[NpyLayout], client: int,
                 views: bool = False) -> list[Any]:
        """Where each key's elements are in the received bytes, after checking dtype and shape: their
        addresses (for ``memmove``, which copies without the GIL) or, with ``views``, zero-copy byte
        memoryviews (slice assignment: cheaper per call, but holds the GIL).

        The common case (the same numpy wrote every client's arrays) costs one ``len`` and one
        ``startswith`` of the header per array; anything else is parsed and compared.
        """
        out: list[Any] = []
        append = out.append
        get = self._record.get
        by_id = _ID_ADDRESS_OK and not views
        addressed = self._addressed
        for key, lay in zip(keys, layouts):
            arr = get(key)
            if arr is None:
                raise InvalidUpdateError("missing", client=client, key=key)
            data = addressed[key] = arr.data
            # the hot loop (once per array of every client): a header identity check, then where it is
            if lay.header and type(data) is bytes and len(data) == lay.end and data.startswith(lay.header) \
                    and arr.stype == NPY_STYPE:
                if by_id:
                    append(id(data) + _BYTES_DATA_OFFSET + lay.offset)
                elif views:
                    append(memoryview(data)[lay.offset : lay.end])
                else:
                    append(buffer_address(data) + lay.offset)
                continue
            try:
                own = self.layout(key)
            except UnsupportedArrayError as err:
                raise InvalidUpdateError(str(err), client=client, key=key) from err
            if own.dtype != lay.dtype or own.shape != lay.shape:
                raise InvalidUpdateError(f"{own.dtype}{own.shape}, expected {lay.dtype}{lay.shape}",
                                         client=client, key=key)
            copy = self._c_copies.get(key)
            if views:
                buf = memoryview(copy).cast("B") if copy is not None else memoryview(data)
                append(buf[own.offset : own.end])
            else:
                append(int(copy.ctypes.data) if copy is not None else buffer_address(data) + own.offset)
        return out


Source = Any  # TensorSource | RecordSource | devft.aggregation.packed.PackedSource


def as_source(update: Any) -> Source:
    """Wrap an update: a mapping of tensors, a record whose values carry ``.npy`` bytes in ``.data``, or a
    record in devft's packed format (:mod:`devft.aggregation.packed`)."""
    if isinstance(update, (TensorSource, RecordSource)) or getattr(update, "kind", None) == "packed":
        return update  # already a source (packed sources are the only other kind)
    if type(update) is dict and all(type(v) is torch.Tensor for v in update.values()):
        return TensorSource(update)  # the common case, without the abstract-class checks below
    from devft.aggregation.packed import MANIFEST_KEY, PackedSource  # packed builds on this module

    if not isinstance(update, Mapping) and not hasattr(update, "items"):
        raise TypeError(f"an update must be a mapping of tensors or a Flower ArrayRecord, got {type(update).__name__}")
    first = next(iter(update.values()), None)
    if first is None or isinstance(first, torch.Tensor):
        return TensorSource(update)
    if hasattr(first, "data") and hasattr(first, "stype"):
        return PackedSource(update) if MANIFEST_KEY in update else RecordSource(update)
    raise TypeError(
        f"update values must be torch tensors or Flower Arrays, got {type(first).__name__}"
    )


def as_sources(updates: Any) -> list[Source]:
    """:func:`as_source` of each client's update; a malformed one raises
    :class:`~devft.aggregation.errors.InvalidUpdateError` naming the client."""
    out = []
    for client, update in enumerate(updates):
        try:
            out.append(as_source(update))
        except UnsupportedArrayError as err:
            raise InvalidUpdateError(str(err), client=client) from err
    return out
