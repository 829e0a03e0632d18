"""The ``native`` backend's inner loops: the C source in :mod:`.native_source`, compiled on first use with the
machine's C compiler and called through ctypes.

Why C: the torch backend sums long runs (packed payloads, large tensors) with one in-place ``add_`` per
client, which reads one input stream at a time; on the 2-core development VM that loop read about 5 GB/s,
half of what numpy's copy moved. The C loop reads four clients' streams in one pass over each cache-sized
output tile: 10.9 GB/s in the same script, and 1.0–1.7× the torch backend's speed in the whole server call
(docs/benchmarks.md, session 12). torch has no fused "sum of N separate buffers" op, and staging the
buffers into one matrix for a gemv costs a copy.

How: the source is compiled once per machine (``$CC``, else ``cc``, ``gcc`` or ``clang``; ``-O3``, no
``-march``: the loop is bound by memory, and a generic build runs anywhere the cache directory is shared)
into ``cache_root()/kernels/native_wsum-<hash of source, compiler and flags>.so``, written atomically, so
every process of a simulation after the first loads it in milliseconds. A library that loads is checked
against numpy on small inputs before use. Where no compiler is found, compiling fails or the check fails,
:func:`native_kernels` returns ``None`` once with a logged reason (:func:`unavailable_reason`), and ``auto``
aggregates with the torch backend.

Only fp32 and fp64 CPU buffers are handled (half precision stays with the torch backend, which converts on
the fly): :func:`run_table` says whether a group qualifies and where each client's runs start.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from devft.aggregation._plan import Group
from devft.aggregation.kernels.native_source import C_SOURCE
from devft.cache import cache_root

log = logging.getLogger(__name__)

SOURCE_NAME = "native_wsum.c"  # what the compiler and its messages call the source
CFLAGS = ("-O3", "-std=c99", "-fPIC", "-shared")
COMPILE_TIMEOUT_S = 120
DEFAULT_TILE_BYTES = 256 << 10  # output tile per pass of four clients (measured best of 16 KiB .. 1 MiB)
SUFFIXES = {torch.float32: "f32", torch.float64: "f64"}
_CTYPES = {torch.float32: np.float32, torch.float64: np.float64}

_unavailable: list[str] = []  # why native_kernels() returned None, once it has


class NativeKernels:
    """The compiled library's entry points, typed."""

    def __init__(self, library: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self._library = library  # kept alive: the functions below point into it
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        self._wsum, self._sqnorms = {}, {}
        for dtype, suffix in SUFFIXES.items():
            wsum = getattr(library, f"devft_wsum_{suffix}")
            sqnorms = getattr(library, f"devft_sqnorms_{suffix}")
            wsum.argtypes = [p, p, p, p, i64, i64, p, i64]
            sqnorms.argtypes = [p, p, p, p, i64, i64, p, i64]
            wsum.restype = sqnorms.restype = None
            self._wsum[dtype], self._sqnorms[dtype] = wsum, sqnorms

    def wsum(self, out: torch.Tensor, table: np.ndarray, lengths: np.ndarray, offsets: np.ndarray,
             weights: np.ndarray, tile_bytes: int = DEFAULT_TILE_BYTES) -> None:
        """``out[offsets[r] + i] = Σ_k weights[k] · run r of client k [i]`` for every run ``r``.

        ``table``: ``(runs, clients)`` int64 start addresses of each client's run, ``lengths`` and
        ``offsets`` int64 element counts, ``weights`` in ``out``'s dtype. The caller keeps the buffers
        alive and makes sure every address is inside them (:func:`run_table` does); ctypes releases the
        GIL for the call, so threads summing different runs overlap."""
        weights = np.ascontiguousarray(weights, dtype=_CTYPES[out.dtype])
        if weights.shape != (table.shape[1],):
            raise ValueError(f"native wsum got {weights.shape} weights for {table.shape[1]} clients")
        self._call(self._wsum[out.dtype], out, table, lengths, offsets, weights, tile_bytes)

    def sq_norms(self, acc: torch.Tensor, table: np.ndarray, lengths: np.ndarray, offsets: np.ndarray,
                 dtype: torch.dtype, centre: torch.Tensor | None = None,
                 tile_bytes: int = DEFAULT_TILE_BYTES) -> None:
        """``acc[k] += Σ_r Σ_i (run r of client k [i] − centre[offsets[r] + i])²`` in fp64 (``acc``: fp64,
        one per client; no ``centre``: plain squares). Buffers as in :meth:`wsum`."""
        if acc.dtype != torch.float64 or acc.shape != (table.shape[1],) or not acc.is_contiguous():
            raise ValueError(f"native sq_norms needs a contiguous fp64 accumulator of {table.shape[1]} clients")
        if centre is not None and (centre.dtype != dtype or not centre.is_contiguous()):
            raise ValueError(f"native sq_norms needs a contiguous {dtype} centre, got {centre.dtype}")
        self._call(self._sqnorms[dtype], acc, table, lengths, offsets, centre, tile_bytes, dtype)

    @staticmethod
    def _call(fn, out, table, lengths, offsets, last, tile_bytes, dtype=None) -> None:  # noqa: ANN001
        itemsize = torch.empty(0, dtype=dtype or out.dtype).element_size()
        runs, clients = table.shape
        if not (len(lengths) == len(offsets) == runs) or table.dtype != np.int64:
            raise ValueError(f"native call with a {table.shape} {table.dtype} table, {len(lengths)} lengths and "
                             f"{len(offsets)} offsets; expected int64 (runs, clients) and one length and offset a run")
        table = np.ascontiguousarray(table)
        lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        pointer = None if last is None else (last.ctypes.data if isinstance(last, np.ndarray) else last.data_ptr())
        fn(out.data_ptr(), table.ctypes.data, lengths.ctypes.data, offsets.ctypes.data, runs, clients, pointer,
           max(1, tile_bytes // itemsize))


def run_table(group: Group) -> np.ndarray | None:
    """``(runs, clients)`` int64 start addresses of every client's runs of ``group``, or ``None`` where the
    native loops cannot read them: a dtype other than fp32/fp64, byte views (plan with addresses), tensors
    not on the CPU or not laid out with unit stride, or an address not aligned to the element size."""
    if group.dtype not in SUFFIXES or not group.elements:
        return None
    columns = []
    for els in group.elements:
        if els and isinstance(els[0], torch.Tensor):
            if any(t.device.type != "cpu" or (t.numel() > 1 and t.stride(0) != 1) for t in els):
                return None
            columns.append([t.data_ptr() for t in els])
        elif all(isinstance(e, int) for e in els):
            columns.append(els)
        else:
            return None
    table = np.array(columns, dtype=np.int64).reshape(len(columns), len(group.runs)).T.copy()
    if (table % group.itemsize).any():
        return None
    return table


def native_kernels() -> NativeKernels | None:
    """The compiled kernels of this process (built or loaded once), or ``None`` with the reason logged once."""
    return _load_once()


def unavailable_reason() -> str | None:
    """Why :func:`native_kernels` returned ``None`` (``None`` if it has not, or has not been asked)."""
    return _unavailable[0] if _unavailable else None


@functools.cache
def _load_once() -> NativeKernels | None:
    try:
        return load(cache_root() / "kernels")
    except Exception as err:  # noqa: BLE001 - whatever fails here, `auto` sums with the torch backend instead
        reason = str(err) if isinstance(err, NativeUnavailableError) else f"{type(err).__name__}: {err}"
        _unavailable.append(reason)
        log.warning("native aggregation kernels unavailable (%s); aggregating with the torch backend", reason)
        return None


class NativeUnavailableError(RuntimeError):
    """The C kernels cannot be built, loaded or trusted on this machine."""


def compiler() -> list[str]:
    """The C compiler command: ``$CC`` (split like a shell would), else the first of ``cc``, ``gcc``, ``clang``."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    raise NativeUnavailableError("no C compiler found: install one (e.g. gcc) or set CC")


def library_path(folder: Path, cc: list[str]) -> Path:
    """Where the build of :data:`C_SOURCE` by ``cc`` goes in ``folder``: named by a hash of the source, the
    compiler command and flags, the compiler's version and the machine."""
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise NativeUnavailableError(f"C compiler {shlex.join(cc)!r} does not run: {err}") from err
    key = hashlib.sha256(b"\0".join([C_SOURCE.encode(), shlex.join([*cc, *CFLAGS]).encode(), version,
                                     platform.machine().encode()])).hexdigest()[:16]
    return folder / f"native_wsum-{key}.so"


def load(folder: Path) -> NativeKernels:
    """The kernels, built into ``folder`` unless an intact build is there (:func:`_intact`), loaded and
    checked; raises :class:`NativeUnavailableError`. A cached build that does not load is built again."""
    cc = compiler()
    path = library_path(folder, cc)
    for candidate in (path, _fallback_folder() / path.name):
        if _intact(candidate):
            try:
                return _open(candidate)
            except _LoadError as err:
                log.warning("%s; building it again", err)
    return _open(_compile(cc, path))


class _LoadError(NativeUnavailableError):
    """The dynamic loader refused the file (nothing of it was loaded, so a new build may be loaded)."""


def _open(path: Path) -> NativeKernels:
    try:
        kernels = NativeKernels(ctypes.CDLL(str(path)), path)
    except (OSError, AttributeError) as err:
        raise _LoadError(f"{path} does not load: {err}") from err
    _check(kernels)
    return kernels


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _intact(path: Path) -> bool:
    """Whether ``path`` is a whole build: its SHA-256 is the one written beside it when it was built (a file
    cut short, by a crash while it was written, would crash the process that maps it)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == _digest_path(path).read_text().strip()
    except OSError:
        return False


def _fallback_folder() -> Path:
    """Where builds go when the cache folder cannot be written: one folder per user in the temporary folder."""
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"devft-kernels-{user}"


def _compile(cc: list[str], path: Path) -> Path:
    """Compile :data:`C_SOURCE` to ``path`` (or, where its folder cannot be written, to the same name in
    :func:`_fallback_folder`), with its digest beside it; returns where the library is.

    The library is written to a temporary file, made readable by everyone (a cache may be shared), synced
    to disk and renamed into place, then its digest the same way: a reader sees a whole build or none, and
    concurrent builders each rename whole files."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        fallback = _fallback_folder()
        log.warning("cannot write %s (%s); building the native kernels in %s", path.parent, err, fallback)
        path = fallback / path.name
        try:
            fallback.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=fallback)
        except OSError as err2:
            raise NativeUnavailableError(f"cannot write {path.parent} either: {err2}") from err2
    os.close(fd)
    source = Path(tmp).with_name(Path(tmp).name.removesuffix(".tmp") + "-" + SOURCE_NAME)
    try:
        source.write_text(C_SOURCE)
        try:
            done = subprocess.run([*cc, *CFLAGS, "-o", tmp, str(source)], capture_output=True, text=True,
                                  timeout=COMPILE_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as err:
            raise NativeUnavailableError(f"compiling {SOURCE_NAME} with {shlex.join(cc)!r} failed: {err}") from err
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()[:3]
            raise NativeUnavailableError(f"compiling {SOURCE_NAME} with {shlex.join(cc)!r} failed "
                                         f"(exit {done.returncode}): {' | '.join(detail)}")
        os.chmod(tmp, 0o755)
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
        _sync(tmp)
        os.replace(tmp, path)
        _write_synced(_digest_path(path), digest + "\n")
    finally:
        Path(tmp).unlink(missing_ok=True)
        source.unlink(missing_ok=True)
    log.info("compiled the native aggregation kernels into %s", path)
    return path


def _sync(name: str | Path) -> None:
    with open(name, "rb") as fh:
        os.fsync(fh.fileno())


def _write_synced(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _check(kernels: NativeKernels) -> None:
    """Both entry points of both dtypes against numpy, on runs that exercise every remainder of four clients,
    with a NaN in the last client's first run (a compiler told to assume finite math would lose it)."""
    rng = np.random.default_rng(0)
    for dtype, np_dtype in _CTYPES.items():
        for clients in (1, 2, 3, 4, 7):
            runs = [rng.standard_normal((clients, n)).astype(np_dtype) for n in (37, 0, 5)]
            runs[0][clients - 1, 5] = np.nan
            weights = rng.standard_normal(clients).astype(np_dtype)
            table = np.array([[r[k].ctypes.data for k in range(clients)] for r in runs], dtype=np.int64)
            lengths = np.array([r.shape[1] for r in runs], dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            out = torch.full((int(lengths.sum()),), float("nan"), dtype=dtype)
            kernels.wsum(out, table, lengths, offsets, weights, tile_bytes=16 * out.element_size())
            want = np.concatenate([(weights.astype(np.float64) @ r.astype(np.float64)) for r in runs])
            centre = torch.from_numpy(rng.standard_normal(out.numel()).astype(np_dtype))
            acc = torch.zeros(clients, dtype=torch.float64)
            kernels.sq_norms(acc, table, lengths, offsets, dtype, centre, tile_bytes=16 * out.element_size())
            stacked = np.concatenate(runs, axis=1).astype(np.float64)
            want_sq = ((stacked - centre.numpy().astype(np.float64)) ** 2).sum(axis=1)
            if not (np.allclose(out.numpy(), want, rtol=1e-5, atol=1e-5, equal_nan=True)
                    and np.allclose(acc.numpy(), want_sq, rtol=1e-6, equal_nan=True)
                    and np.isnan(out.numpy()).sum() == 1 and np.isnan(acc.numpy()).sum() == 1):
                raise NativeUnavailableError(f"{kernels.path} gives wrong sums ({dtype}, {clients} clients): its "
                                             "compiler builds it wrongly; set CC to another compiler")
