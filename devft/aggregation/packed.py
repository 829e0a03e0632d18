"""The packed wire format: one client's LoRA as one flat array per dtype plus a manifest, in one ArrayRecord.

Flower's usual payload, ``ArrayRecord(state_dict)``, holds one ``.npy`` array per tensor: 420 arrays for the
LoRA of SmolLM2-135M, 13 440 per round at 32 clients. Every consumer then pays per array (Flower's own
aggregation parses each header with ``ast``; any Python loop pays ~1 µs an array), which measured as the
limit of server aggregation (docs/benchmarks.md). The packed format puts all tensors of one dtype back to
back in one array, so a round is a few large contiguous buffers:

- ``devft.packed.manifest``: a ``uint8`` array holding UTF-8 JSON
  ``{"format": "devft.packed", "version": 1, "tensors": [[key, dtype, shape], ...]}``;
- ``devft.packed.<dtype>`` (``float32``, ``float16`` or ``float64``): the elements of that dtype's tensors,
  concatenated in manifest order, each in C order.

Both are ordinary numpy-serialised Flower ``Array``s, so any Flower tool can read the record; the manifest
costs less than the per-array headers it replaces. :class:`PackedSource` reads it in place (zero-copy views,
the manifest parsed once per distinct manifest: every client of a round sends the same one) and tells the
kernels which requested keys lie back to back (:meth:`PackedSource.runs`), so a whole payload is one copy
or one accumulation per client instead of one per tensor.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from devft.aggregation.errors import InvalidUpdateError
from devft.aggregation.sources import (
    ITEMSIZE,
    NPY_STYPE,
    BoundedCache,
    UnsupportedArrayError,
    parse_npy_header,
)

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

FORMAT = "devft.packed"
VERSION = 1
MANIFEST_KEY = "devft.packed.manifest"
DATA_PREFIX = "devft.packed."
WIRE_FORMATS = ("packed", "arrays")

_DTYPE_BY_NAME = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
_NAME_BY_DTYPE = {v: k for k, v in _DTYPE_BY_NAME.items()}
_NUMPY = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def is_packed(record: Any) -> bool:
    """Whether ``record`` (an ArrayRecord or mapping) is in the packed format."""
    try:
        return MANIFEST_KEY in record
    except TypeError:
        return False


@dataclass(frozen=True)
class Manifest:
    """Keys, dtypes and shapes of a packed payload, and where each tensor sits in its dtype's array."""

    keys: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]  # element offset of each tensor inside its dtype's array
    totals: dict[torch.dtype, int]  # elements of each dtype's array, in first-appearance order
    index: dict[str, int]
    raw: bytes  # the JSON as it travels

    @staticmethod
    def build(entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], raw: bytes | None = None) -> Manifest:
        keys, dtypes, shapes, offsets = [], [], [], []
        totals: dict[torch.dtype, int] = {}
        index: dict[str, int] = {}
        for key, dtype, shape in entries:
            if key in index:
                raise UnsupportedArrayError(f"packed manifest lists key {key!r} twice")
            index[key] = len(keys)
            keys.append(key)
            dtypes.append(dtype)
            shapes.append(shape)
            offsets.append(totals.get(dtype, 0))
            totals[dtype] = totals.get(dtype, 0) + math.prod(shape)
        if raw is None:
            doc = {"format": FORMAT, "version": VERSION,
                   "tensors": [[k, _NAME_BY_DTYPE[d], list(s)] for k, d, s in entries]}
            raw = json.dumps(doc, separators=(",", ":")).encode()
        return Manifest(tuple(keys), tuple(dtypes), tuple(shapes), tuple(offsets), totals, index, raw)

    @staticmethod
    def of(tensors: Mapping[str, torch.Tensor]) -> Manifest:
        """The manifest of packing ``tensors`` in their order (refuses dtypes numpy cannot carry)."""
        entries = []
        for key, t in tensors.items():
            if t.dtype not in _NAME_BY_DTYPE:
                raise ValueError(f"tensor {key!r} has dtype {t.dtype}; the packed format carries float16, float32 "
                                 "and float64 (convert bfloat16 first)")
            entries.append((key, t.dtype, tuple(int(s) for s in t.shape)))
        return Manifest.build(entries)

    @staticmethod
    def parse(raw: bytes) -> Manifest:
        """The manifest in ``raw`` (JSON bytes); cached, so every client's identical manifest is one object."""
        cached = _MANIFESTS.lookup(raw)
        if cached is not None:
            return cached
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise UnsupportedArrayError(f"packed manifest is not UTF-8 JSON ({type(err).__name__}: "
                                        f"{str(err)[:200]})") from err
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
            head = {k: doc.get(k) for k in ("format", "version")} if isinstance(doc, dict) else type(doc).__name__
            raise UnsupportedArrayError(f"packed manifest has {head}, expected format {FORMAT!r} version {VERSION}")
        tensors = doc.get("tensors", [])
        if not isinstance(tensors, list):
            raise UnsupportedArrayError(f"packed manifest field 'tensors' must be a list, got "
                                        f"{type(tensors).__name__}")
        entries = []
        for item in tensors:
            if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                    and item[1] in _DTYPE_BY_NAME and isinstance(item[2], list)
                    and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in item[2])):
                raise UnsupportedArrayError(f"packed manifest entry {item!r} is not [key, float dtype, shape]")
            entries.append((item[0], _DTYPE_BY_NAME[item[1]], tuple(item[2])))
        manifest = Manifest.build(entries, raw)
        _MANIFESTS.keep(raw, manifest)
        return manifest

    def runs(self, keys: Sequence[str]) -> list[tuple[int, int]]:
        """``(element offset in its dtype's array, elements)`` of each maximal run of ``keys`` (all of one
        dtype, in this order) that lie back to back in the packed array."""
        out: list[tuple[int, int]] = []
        end = -1
        for key in keys:
            i = self.index[key]
            off, n = self.offsets[i], math.prod(self.shapes[i])
            if off == end and out:
                start, count = out[-1]
                out[-1] = (start, count + n)
            else:
                out.append((off, n))
            end = off + n
        return out


# one manifest per distinct model/rule/rank layout; SmolLM2-135M's 420 LoRA tensors take about 30 kB
_MANIFESTS = BoundedCache(entries=64, key_bytes=1 << 20)


def _view(data: bytes, dtype: torch.dtype, offset_bytes: int, numel: int) -> torch.Tensor:
    """A zero-copy, **read-only** 1-D tensor of ``numel`` elements at ``offset_bytes`` of ``data``."""
    arr = np.frombuffer(data, dtype=_NUMPY[dtype], count=numel, offset=offset_bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the given NumPy array is not writable"
        return torch.from_numpy(arr)


class PackedSource:
    """One client's update in the packed format, read in place (the source interface of
    :mod:`devft.aggregation.sources`, plus :meth:`run_views` for whole runs of keys)."""

    kind = "packed"

    def __init__(self, record: Mapping[str, Any]) -> None:
        items = dict(record.items())
        manifest_array = items.pop(MANIFEST_KEY)
        self.manifest = Manifest.parse(_npy_payload(manifest_array, MANIFEST_KEY))
        self._data: dict[torch.dtype, tuple[bytes, int]] = {}  # dtype -> (bytes, offset of the first element)
        for dtype, total in self.manifest.totals.items():
            key = DATA_PREFIX + _NAME_BY_DTYPE[dtype]
            arr = items.pop(key, None)
            if arr is None:
                raise UnsupportedArrayError(f"packed record lacks {key!r}, which its manifest needs")
            if getattr(arr, "stype", None) != NPY_STYPE:
                raise UnsupportedArrayError(f"array {key!r} has stype {getattr(arr, 'stype', None)!r}, "
                                            f"expected {NPY_STYPE!r}")
            layout = parse_npy_header(arr.data, key)
            if layout.dtype != dtype or layout.shape != (total,):
                raise UnsupportedArrayError(f"array {key!r} is {layout.dtype}{layout.shape}, its manifest needs "
                                            f"{dtype}({total},)")
            if len(arr.data) != layout.end:
                raise UnsupportedArrayError(f"array {key!r} holds {len(arr.data)} bytes, expected {layout.end}")
            self._data[dtype] = (arr.data, layout.offset)
        if items:
            raise UnsupportedArrayError(f"packed record has arrays its manifest does not name: {sorted(items)[:3]}")

    def keys(self) -> list[str]:
        return list(self.manifest.keys)

    def has(self, key: str) -> bool:
        return key in self.manifest.index

    def meta(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        i = self.manifest.index[key]
        return self.manifest.dtypes[i], self.manifest.shapes[i]

    def device(self, key: str) -> torch.device:
        return torch.device("cpu")

    def tensor(self, key: str) -> torch.Tensor:
        """A zero-copy, read-only view of ``key`` (never write into it: it aliases the received bytes)."""
        i = self.manifest.index[key]
        dtype, shape = self.manifest.dtypes[i], self.manifest.shapes[i]
        data, start = self._data[dtype]
        return _view(data, dtype, start + self.manifest.offsets[i] * ITEMSIZE[dtype], math.prod(shape)).view(shape)

    def elements(self, keys: Sequence[str], metas: Sequence[tuple[torch.dtype, tuple[int, ...]]], client: int,
                 device: torch.device) -> list[torch.Tensor]:
        """The flat view of each key, after checking it has the expected dtype and shape (the per-key path,
        for rounds whose payloads do not all share one manifest)."""
        if device.type != "cpu":
            raise InvalidUpdateError(f"is a packed record in host memory, the others are on {device}", client=client)
        out = []
        for key, meta in zip(keys, metas):
            if key not in self.manifest.index:
                raise InvalidUpdateError("missing", client=client, key=key)
            got = self.meta(key)
            if got != meta:
                raise InvalidUpdateError(f"{got[0]}{got[1]}, expected {meta[0]}{meta[1]}", client=client, key=key)
            out.append(self.tensor(key).reshape(-1))
        return out

    def run_views(self, dtype: torch.dtype, runs: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Zero-copy, read-only 1-D views of ``(element offset, elements)`` runs of ``dtype``'s array."""
        data, start = self._data[dtype]
        isz = ITEMSIZE[dtype]
        return [_view(data, dtype, start + off * isz, n) for off, n in runs]


def _npy_payload(arr: Any, key: str) -> bytes:
    """The element bytes of a 1-D ``.npy`` array of ``uint8`` (the manifest)."""
    data = arr.data
    if getattr(arr, "stype", None) != NPY_STYPE:
        raise UnsupportedArrayError(f"array {key!r} is not a numpy-serialised array")
    layout = parse_npy_header(data, key, dtypes=(torch.uint8,))
    if len(layout.shape) != 1 or len(data) != layout.end:
        raise UnsupportedArrayError(f"array {key!r} must be one-dimensional uint8 (JSON bytes) of the length its "
                                    f"header gives, got shape {layout.shape} in {len(data)} bytes")
    return bytes(data[layout.offset :])


def pack_arrayrecord(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """``tensors`` as one packed ``ArrayRecord`` (CPU copies; keys in the given order)."""
    from flwr.app import ArrayRecord

    from devft.aggregation.records import npy_bytes

    manifest = Manifest.of(tensors)
    record = ArrayRecord()
    record[MANIFEST_KEY] = npy_bytes(torch.frombuffer(bytearray(manifest.raw), dtype=torch.uint8), MANIFEST_KEY)
    for dtype, total in manifest.totals.items():
        flat = torch.empty(total, dtype=dtype)
        for i, key in enumerate(manifest.keys):
            if manifest.dtypes[i] == dtype:
                n = math.prod(manifest.shapes[i])
                flat[manifest.offsets[i] : manifest.offsets[i] + n].copy_(tensors[key].detach().reshape(-1))
        record[DATA_PREFIX + _NAME_BY_DTYPE[dtype]] = npy_bytes(flat, DATA_PREFIX + _NAME_BY_DTYPE[dtype])
    return record


def pack_flats(flats: Sequence[tuple[Any, torch.Tensor]], order: Sequence[str],
               manifest: Manifest | None = None) -> ArrayRecord:
    """A packed ``ArrayRecord`` straight from the kernels' flat sums (one ``(Group, flat)`` per dtype): each
    group's flat buffer, cast to the group's dtype, *is* that dtype's packed array, so this costs one cast and
    one copy per dtype. ``manifest``: the inputs' manifest, reused when ``order`` is its key order."""
    from flwr.app import ArrayRecord

    from devft.aggregation.records import npy_bytes

    if manifest is None or list(manifest.keys) != list(order):
        meta = {k: (g.dtype, s) for g, _ in flats for k, s in zip(g.keys, g.shapes)}
        manifest = Manifest.build([(k, *meta[k]) for k in order])
    record = ArrayRecord()
    record[MANIFEST_KEY] = npy_bytes(torch.frombuffer(bytearray(manifest.raw), dtype=torch.uint8), MANIFEST_KEY)
    for group, flat in flats:
        if list(manifest.runs(group.keys)) != [(0, group.total)]:
            raise ValueError("pack_flats needs the keys of each dtype in output order")  # a caller's bug
        key = DATA_PREFIX + _NAME_BY_DTYPE[group.dtype]
        record[key] = npy_bytes(flat.to(group.dtype), key)
    return record


def packed_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """What :func:`pack_arrayrecord` of ``tensors`` occupies on the wire, as ``ArrayRecord.count_bytes`` counts
    it (each array's ``.npy`` bytes plus its key's length)."""
    from devft.aggregation.records import npy_nbytes

    manifest = Manifest.of(tensors)
    total = npy_nbytes(torch.uint8, (len(manifest.raw),)) + len(MANIFEST_KEY)
    for dtype, n in manifest.totals.items():
        total += npy_nbytes(dtype, (n,)) + len(DATA_PREFIX + _NAME_BY_DTYPE[dtype])
    return total


def wire_record(tensors: Mapping[str, torch.Tensor], wire_format: str) -> ArrayRecord:
    """``tensors`` as an ArrayRecord in ``wire_format``: ``packed`` or ``arrays`` (one Flower array per tensor)."""
    from devft.aggregation.records import to_arrayrecord

    if wire_format == "packed":
        return pack_arrayrecord(tensors)
    if wire_format == "arrays":
        return to_arrayrecord(tensors)
    raise ValueError(f"unknown wire_format={wire_format!r}; choose one of {list(WIRE_FORMATS)}")
