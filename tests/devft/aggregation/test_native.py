"""The native backend: its C loops against an independent formula, that they are really the ones used, how
they are built and cached, and what happens where they cannot be."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from aggregation_cases import (
    CASES,
    HAS_C_COMPILER,
    TOLERANCES,
    independent,
    make_updates,
    mixed_dtype_updates,
    weights_for,
)
from flwr.app import Array, ArrayRecord

import devft.aggregation.kernels as kernels
from devft.aggregation import aggregate_arrayrecords, pack_arrayrecord, record_tensors, weighted_sum_many
from devft.aggregation._plan import Group
from devft.aggregation.kernels import native
from devft.aggregation.kernels.torch_blocked import client_sq_norms_torch, weighted_sum_many_torch

REPO = Path(__file__).resolve().parents[3]
NATIVE_DTYPES = [t for t in TOLERANCES if t[0] in (torch.float32, torch.float64)]

if not HAS_C_COMPILER:
    pytest.skip("no C compiler on this machine: the native backend cannot be built", allow_module_level=True)


@pytest.fixture
def kernels_spy(monkeypatch):
    """The process's compiled kernels, counting the calls of each entry point."""
    lib = native.native_kernels()
    assert lib is not None, native.unavailable_reason()
    calls = {"wsum": 0, "sq_norms": 0}
    for name in calls:
        real = getattr(lib, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(lib, name, counted)
    return lib, calls


def as_records(updates) -> list[ArrayRecord]:
    return [ArrayRecord({k: Array(v.numpy()) for k, v in u.items()}) for u in updates]


@pytest.mark.parametrize("dtype,atol,rtol", NATIVE_DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_native_sums_match_the_formula_for_tensors_records_and_any_threads(case, dtype, atol, rtol, kernels_spy):
    lib, calls = kernels_spy
    clients, shapes = CASES[case]
    updates = make_updates(clients, shapes, dtype, seed=11)
    weights = weights_for(clients)
    expected = independent(updates, weights)
    one = weighted_sum_many_torch(updates, weights, threads=1, native=lib)
    assert calls["wsum"] == 1  # one C call for every run of the group, not the torch loops
    for key, exp in expected.items():
        assert one[key].dtype == dtype
        torch.testing.assert_close(one[key].double(), exp.to(dtype).double(), atol=atol, rtol=rtol)
    for threads in (2, 3):  # each output element is summed by one thread, in the same order: bitwise equal
        for source in (updates, as_records(updates)):
            out = weighted_sum_many_torch(source, weights, threads=threads, native=lib)
            assert all(torch.equal(out[k], one[k]) for k in one), (threads, type(source[0]))
    assert torch.equal(weighted_sum_many(as_records(updates), weights, backend="native")["t0"], one["t0"])


def test_packed_records_are_summed_natively_with_the_torch_backends_result(kernels_spy):
    _, calls = kernels_spy
    updates = make_updates(6, [(300, 701), (5,), (4, 8)], torch.float32, seed=2)
    packed = [pack_arrayrecord(u) for u in updates]
    counts = [3, 1, 4, 1, 5, 9]
    ours = record_tensors(aggregate_arrayrecords(packed, counts, backend="native"))
    assert calls["wsum"] == 1
    torch_loops = record_tensors(aggregate_arrayrecords(packed, counts, backend="torch"))
    expected = independent(updates, [c / sum(counts) for c in counts])
    for key in expected:
        torch.testing.assert_close(ours[key].double(), expected[key], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ours[key], torch_loops[key], atol=1e-6, rtol=1e-5)


def test_half_precision_keys_of_a_native_call_take_the_torch_loops(kernels_spy):
    lib, calls = kernels_spy
    updates = mixed_dtype_updates(3, seed=5)  # fp16, fp32 and fp64 keys
    out = weighted_sum_many_torch(updates, [0.5, 0.25, 0.25], native=lib)
    assert calls["wsum"] == 2  # the fp32 and fp64 groups
    expected = independent(updates, [0.5, 0.25, 0.25])
    for key, (dtype, atol, rtol) in zip(("t0", "t1", "t2"), [TOLERANCES[1], TOLERANCES[0], TOLERANCES[3]]):
        assert out[key].dtype == dtype
        torch.testing.assert_close(out[key].double(), expected[key].to(dtype).double(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_native_squared_norms_and_distances_match_the_formula(case, dtype, rtol, kernels_spy, monkeypatch):
    from devft.aggregation.kernels import torch_blocked

    monkeypatch.setattr(torch_blocked, "NATIVE_NORM_PART", 5000)  # several parts in the larger cases
    lib, calls = kernels_spy
    clients, shapes = CASES[case]
    updates = make_updates(clients, shapes, dtype, seed=3)
    origin = make_updates(1, shapes, dtype, seed=4)[0]
    plain = torch.tensor([sum(float(u[k].double().pow(2).sum()) for k in u) for u in updates], dtype=torch.float64)
    far = torch.tensor([sum(float((u[k].double() - origin[k].double()).pow(2).sum()) for k in u) for u in updates],
                       dtype=torch.float64)
    for source in (updates, as_records(updates)):
        for want, centre in ((plain, None), (far, origin)):
            one = client_sq_norms_torch(source, origin=centre, threads=1, native=lib)
            torch.testing.assert_close(one, want, rtol=rtol, atol=0)
            # parts of a fixed size, whichever thread measures them: the same norms to the last bit
            assert torch.equal(client_sq_norms_torch(source, origin=centre, threads=3, native=lib), one)
    assert calls["sq_norms"] >= 4


def test_clipping_in_a_native_call_takes_native_norms(kernels_spy):
    lib, calls = kernels_spy
    updates = make_updates(3, [(10, 4), (7,)], torch.float32, seed=7)
    updates[1] = {k: 50 * v for k, v in updates[1].items()}
    norms = [sum(float(v.double().pow(2).sum()) for v in u.values()) ** 0.5 for u in updates]
    factors = [min(1.0, 3.0 / n) for n in norms]
    out = weighted_sum_many_torch(updates, [0.2, 0.3, 0.5], clip_norm=3.0, native=lib)
    assert calls == {"wsum": 1, "sq_norms": 1}
    expected = independent(updates, [w * f for w, f in zip([0.2, 0.3, 0.5], factors)])
    for key in expected:
        torch.testing.assert_close(out[key].double(), expected[key], atol=1e-6, rtol=1e-5)


def test_strided_tensors_and_misaligned_addresses_are_left_to_the_torch_loops(kernels_spy):
    lib, calls = kernels_spy
    base = [torch.randn(40, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    strided = [{"x": b[::2]} for b in base]  # 1-D views with stride 2
    out = weighted_sum_many_torch(strided, [1.0, 2.0, 3.0], native=lib)["x"]
    assert calls["wsum"] == 0
    torch.testing.assert_close(out, base[0][::2] + 2 * base[1][::2] + 3 * base[2][::2])
    group = Group(torch.float32)
    group.add("x", (4,), None)
    buf = torch.zeros(8)
    group.elements = [[buf.data_ptr()], [buf.data_ptr() + 2]]  # client 1's run is not 4-byte aligned
    assert native.run_table(group) is None
    group.elements = [[buf.data_ptr()], [buf.data_ptr() + 4]]
    assert native.run_table(group).tolist() == [[buf.data_ptr(), buf.data_ptr() + 4]]
    group.dtype = torch.float16
    assert native.run_table(group) is None


def test_the_library_is_built_once_and_then_loaded_from_the_cache(tmp_path, monkeypatch):
    first = native.load(tmp_path)
    assert first.path.parent == tmp_path and first.path.name.startswith("native_wsum-")
    monkeypatch.setattr(native, "_compile", lambda *a: pytest.fail("compiled again"))
    assert native.load(tmp_path).path == first.path
    # the library and its digest, readable by everyone (a shared cache); no temporary file left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.path.name, first.path.name + ".sha256"]
    assert os.stat(first.path).st_mode & 0o777 == 0o755
    assert os.stat(first.path.with_name(first.path.name + ".sha256")).st_mode & 0o777 == 0o644


@pytest.mark.parametrize("damage", ["truncated", "no digest", "not a library"])
def test_a_damaged_cached_library_is_built_again_not_loaded(damage, tmp_path, caplog):
    cc = native.compiler()
    built = native._compile(cc, native.library_path(tmp_path, cc))  # not loaded: this process maps no damage
    digest = built.with_name(built.name + ".sha256")
    if damage == "truncated":  # what a crash while writing leaves: mapping it would kill the process (SIGBUS)
        built.write_bytes(built.read_bytes()[:12000])
    elif damage == "no digest":
        digest.unlink()
    else:  # a file whose digest matches but that the loader refuses
        built.write_bytes(b"not an ELF file")
        digest.write_text(native.hashlib.sha256(b"not an ELF file").hexdigest())
    with caplog.at_level(logging.WARNING):
        again = native.load(tmp_path)
    assert again.path == built and native._intact(built)
    assert ("does not load" in caplog.text) == (damage == "not a library")
    out = torch.empty(2, dtype=torch.float32)
    x = np.array([1.0, 2.0], dtype=np.float32)
    again.wsum(out, np.array([[x.ctypes.data]], dtype=np.int64), np.array([2]), np.array([0]), [3.0])
    assert out.tolist() == [3.0, 6.0]


def test_another_compiler_command_builds_another_library(tmp_path, monkeypatch):
    default = native.load(tmp_path).path
    monkeypatch.setenv("CC", f"{native.compiler()[0]} -DDEVFT_ANY_FLAG")
    assert native.load(tmp_path).path != default


def test_a_folder_that_cannot_be_written_builds_once_into_a_folder_per_user(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(native.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with caplog.at_level(logging.WARNING):
        lib = native.load(blocked / "kernels")
    assert lib.path.parent == native._fallback_folder() and lib.path.parent.is_relative_to(tmp_path / "tmp")
    assert "cannot write" in caplog.text
    monkeypatch.setattr(native, "_compile", lambda *a: pytest.fail("compiled again"))
    assert native.load(blocked / "kernels").path == lib.path  # the next process finds it there


@pytest.mark.parametrize(("cc", "message"), [
    ("/nonexistent/cc", r"C compiler '/nonexistent/cc' does not run"),
    ("false", r"compiling native_wsum.c with 'false' failed \(exit 1\)"),
    (None, r"failed \(exit 1\): .*nonexistent-header\.h"),  # the compiler's own message, first lines
])
def test_a_compiler_that_fails_is_named_with_its_message(cc, message, tmp_path, monkeypatch):
    monkeypatch.setenv("CC", cc or f"{native.compiler()[0]} -include nonexistent-header.h")
    with pytest.raises(native.NativeUnavailableError, match=message):
        native.load(tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_library_that_sums_wrongly_or_loses_a_nan_is_refused():
    class Wrong:
        path = Path("wrong.so")

        def wsum(self, out, *args, **kwargs):
            out.zero_()

        def sq_norms(self, *args, **kwargs):
            pass

    with pytest.raises(native.NativeUnavailableError, match="wrong.so gives wrong sums"):
        native._check(Wrong())
    real = native.native_kernels()

    class FiniteMath:  # right sums, but NaN dropped (what -ffast-math in CC could give)
        path = Path("fast-math.so")

        def wsum(self, out, *args, **kwargs):
            real.wsum(out, *args, **kwargs)
            torch.nan_to_num_(out, nan=0.0)

        def sq_norms(self, acc, *args, **kwargs):
            real.sq_norms(acc, *args, **kwargs)
            torch.nan_to_num_(acc, nan=0.0)

    with pytest.raises(native.NativeUnavailableError, match="fast-math.so gives wrong sums"):
        native._check(FiniteMath())
    native._check(real)


def test_tiny_values_keep_their_squares():
    lib = native.native_kernels()
    for scale in (1e-25, 1e-20, 1e20):  # squares below fp32's smallest number, near it, and beyond fp32's range
        x = np.full(3000, scale, dtype=np.float32)
        acc = torch.zeros(1, dtype=torch.float64)
        lib.sq_norms(acc, np.array([[x.ctypes.data]], dtype=np.int64), np.array([3000]), np.array([0]),
                     torch.float32)
        assert float(acc[0]) == pytest.approx(3000 * float(np.float32(scale)) ** 2, rel=1e-6), scale


@pytest.fixture
def fresh_native(monkeypatch):
    """A process with no native kernels loaded yet; the real ones are loaded again afterwards."""
    native._load_once.cache_clear()
    native._unavailable.clear()
    yield
    native._load_once.cache_clear()
    native._unavailable.clear()


def test_without_a_compiler_auto_takes_torch_and_says_why_once(fresh_native, monkeypatch, caplog):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    updates = make_updates(3, [(5, 4)], torch.float32)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            out = weighted_sum_many(updates, [1.0, 1.0, 1.0])
            assert kernels.resolve_backend("auto", torch.device("cpu")) == "torch"
    torch.testing.assert_close(out["t0"], updates[0]["t0"] + updates[1]["t0"] + updates[2]["t0"])
    assert caplog.text.count("native aggregation kernels unavailable") == 1
    assert "aggregating with the torch backend" in caplog.text
    assert "native" not in kernels.available_backends()
    with pytest.raises(RuntimeError, match=r"backend='native' is unavailable here: C compiler '/nonexistent/cc'"):
        weighted_sum_many(updates, [1.0, 1.0, 1.0], backend="native")


def test_any_failure_to_build_leaves_auto_on_the_torch_backend(fresh_native, monkeypatch, caplog):
    def broken(folder):
        raise FileNotFoundError(2, "No such file or directory", str(folder))

    monkeypatch.setattr(native, "load", broken)
    with caplog.at_level(logging.WARNING):
        out = weighted_sum_many(make_updates(2, [(3,)], torch.float32), [1.0, 1.0])
    assert out["t0"].shape == (3,) and "native aggregation kernels unavailable (FileNotFoundError" in caplog.text


def test_a_rules_backend_and_threads_reach_its_norm_bounding(kernels_spy, monkeypatch):
    from devft.aggregation import get_rule
    from devft.aggregation.norm_bound import bound_updates

    _, calls = kernels_spy
    updates = make_updates(3, [(4, 6), (6, 4)], torch.float32, seed=1)
    seen = []
    real = kernels.client_sq_norms

    def spy(*args, **kwargs):
        seen.append((kwargs.get("backend"), kwargs.get("threads")))
        return real(*args, **kwargs)

    monkeypatch.setattr("devft.aggregation.norm_bound.client_sq_norms", spy)
    for backend, native_calls in (("torch", 0), ("native", 1)):
        rule = get_rule("fedit", alpha=8.0, backend=backend, threads=2)
        state = rule.init_state({k: torch.zeros_like(v) for k, v in updates[0].items()})
        bound_updates(rule, state, updates, max_norm=1.0)
        assert calls["sq_norms"] == native_calls and seen[-1] == (backend, 2)


def test_native_refuses_data_that_is_not_on_the_cpu():
    with pytest.raises(ValueError, match="backend='native' sums CPU data; these updates are on cuda"):
        kernels.resolve_backend("native", torch.device("cuda"))


def test_the_c_source_travels_in_a_flower_app_bundle():
    """``flwr run`` ships a FAB holding only files its built-in patterns match (a ``.c`` file is left out, and
    those processes summed with the torch backend): the source must be in one of them."""
    import pathspec
    from flwr.common.constant import FAB_INCLUDE_PATTERNS

    spec = pathspec.PathSpec.from_lines("gitwildmatch", FAB_INCLUDE_PATTERNS)
    module = Path(native.__file__).with_name("native_source.py").relative_to(REPO).as_posix()
    assert spec.match_file(module) and not spec.match_file("devft/aggregation/kernels/native_wsum.c")
    assert "devft_wsum_f32" in native.C_SOURCE


def test_weights_are_converted_to_the_data_dtype_and_counted():
    lib = native.native_kernels()
    out = torch.empty(3, dtype=torch.float64)
    x = np.arange(3, dtype=np.float64)
    table = np.array([[x.ctypes.data, x.ctypes.data]], dtype=np.int64)
    lib.wsum(out, table, np.array([3]), np.array([0]), [0.5, 0.25])
    assert out.tolist() == [0.0, 0.75, 1.5]
    with pytest.raises(ValueError, match=r"\(3,\) weights for 2 clients"):
        lib.wsum(out, table, np.array([3]), np.array([0]), [0.5, 0.25, 1.0])
