"""The backend contract (dca/backends.py), the start-up self-check and its fallback (dca/selfcheck.py),
and DCA's per-cache state kept off the cache objects (dca/state.py).

The self-check runs on CUDA; here it is forced on CPU (`selfcheck.FORCE_ON_CPU`) and "auto" is made
to resolve to the Triton kernels as it does on a GPU, so the kernels run in Triton's interpreter
through the same code as on a GPU: `select` -> `selfcheck.check` -> the backend's contract ->
dca.triton_kernels. Failures are injected into dca.triton_kernels (a compile error at launch, a
chunk off by one, a NaN), as a GPU would produce them.
"""

import copy
import dataclasses
import logging

import pytest
import torch
from torch.testing import assert_close

from dca import (
    BackendReport,
    BackendUnavailable,
    DCAConfig,
    apply_dca,
    backend_report,
    backend_reports,
    kernels,
    prepare_backend,
    selfcheck,
)
from dca.backends import TorchBackend, TritonBackend
from tests.dca.conftest import HAS_TRITON, TINY_DCA, left_pad, tiny_model

needs_interpreter = pytest.mark.skipif(not (HAS_TRITON and kernels.triton_interpreted()),
                                       reason="needs triton and its interpreter (CPU)")
AUTO = DCAConfig(32, chunk_size=24, local_window=4, temperature_alpha=0.2)
TRITON = dataclasses.replace(AUTO, backend="triton")
TORCH = dataclasses.replace(AUTO, backend="torch")


def ids(length, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 101, (batch, length), generator=g)


@pytest.fixture
def fresh_checks():
    """No self-check result kept from another test (they are kept per process)."""
    selfcheck.clear()
    yield
    selfcheck.clear()


@pytest.fixture
def gpu_like(monkeypatch, fresh_checks, one_torch_thread):
    """The CPU made to choose as a GPU does: "auto" resolves to the Triton kernels and the
    self-check is required (the kernels run in Triton's interpreter)."""
    if not (HAS_TRITON and kernels.triton_interpreted()):
        pytest.skip("needs triton and its interpreter (CPU)")
    resolve = kernels.resolve_backend
    monkeypatch.setattr(kernels, "resolve_backend",
                        lambda requested, device, dtype: resolve("triton" if requested == "auto" else requested,
                                                                 device, dtype))
    monkeypatch.setattr(selfcheck, "FORCE_ON_CPU", True)
    from dca import triton_kernels

    return triton_kernels


def dca_records(caplog):
    return [r for r in caplog.records if r.name == "dca"]


# --- the report on CPU ---------------------------------------------------------------------------


def test_the_cpu_runs_torch_and_says_so():
    model = apply_dca(tiny_model(), TINY_DCA)
    assert backend_report(model) is None and backend_reports(model) == ()  # nothing ran yet
    model(ids(30), use_cache=True)
    report = backend_report(model)
    assert report == BackendReport(requested="auto", chosen="torch", ran="torch", fallback_reason=None, checked=False,
                                   device="cpu", dtype="float64", kv_dtype="auto", check_seconds=None)
    assert report.to_dict()["ran"] == "torch" and backend_reports(model) == (report,)
    assert backend_report(tiny_model()) is None  # not a DCA model


def test_prepare_backend_chooses_before_any_forward_one_report_per_kv_dtype():
    model = apply_dca(tiny_model(dtype=torch.float32), TINY_DCA)
    first = prepare_backend(model)
    assert (first.ran, first.dtype, first.kv_dtype) == ("torch", "float32", "auto")
    int8 = prepare_backend(model, kv_dtype="int8")
    assert int8.kv_dtype == "int8" and backend_report(model) is int8
    assert backend_reports(model) == (first, int8)
    with pytest.raises(ValueError, match="kv_dtype"):
        prepare_backend(model, kv_dtype="fp8")
    with pytest.raises(ValueError, match="apply_dca"):
        prepare_backend(tiny_model())


def test_the_self_check_is_not_run_on_cpu_unless_forced(fresh_checks):
    assert not selfcheck.required(torch.device("cpu")) and selfcheck.required(torch.device("cuda"))
    if HAS_TRITON and kernels.triton_interpreted():
        model = apply_dca(tiny_model(), TRITON)
        report = prepare_backend(model)
        assert report.ran == "triton" and not report.checked and report.check_seconds is None


# --- the self-check ----------------------------------------------------------------------------


def generate(model, batch, mask, new_tokens=8):
    return model.generate(batch, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                          eos_token_id=None)


def two_documents():
    return left_pad([ids(45, seed=3), ids(26, seed=4)])


def test_a_correct_triton_run_passes_the_check(gpu_like, caplog):
    model = apply_dca(tiny_model(), AUTO)
    with caplog.at_level(logging.WARNING, logger="dca"):
        report = prepare_backend(model)
    assert report.ran == report.chosen == "triton" and report.checked and report.fallback_reason is None
    assert 0 < report.check_seconds < 120 and not dca_records(caplog)
    # the same key in a second model of the process: the result is reused, not re-run
    again = prepare_backend(apply_dca(tiny_model(seed=5), AUTO))
    assert again.ran == "triton" and again.checked and again.check_seconds is None
    batch, mask = two_documents()
    expected = generate(apply_dca(tiny_model(), TORCH), batch, mask)
    assert torch.equal(generate(model, batch, mask), expected)


# Injected at the public functions the Triton backend calls (attention, store), so that the
# injections hold whatever the kernels' internals become.


def inject_compile_error(monkeypatch, triton_kernels):
    """The first launch fails as a compile (or ptxas, or cubin load) error does: Triton compiles
    at the first launch."""
    from triton.compiler.errors import CompilationError

    def attention(*args, **kwargs):
        raise CompilationError(None, None, "ptxas fatal : Unsupported .version 9.0; current version is '8.7'")

    monkeypatch.setattr(triton_kernels, "attention", attention)


def inject_wrong_result(monkeypatch, triton_kernels):
    """Decode steps (a few queries) with a chunk off by one (chunk_len - 1): the kind of indexing
    slip that compiles and runs and is wrong."""
    attention = triton_kernels.attention

    def wrong(q, k, v, row_start, seq_end, scale, cos, sin, config, *rest, **kw):
        if q.shape[2] <= triton_kernels.DECODE_MAX_QUERIES:
            config = dataclasses.replace(config, local_window=config.local_window + 1)
        return attention(q, k, v, row_start, seq_end, scale, cos, sin, config, *rest, **kw)

    monkeypatch.setattr(triton_kernels, "attention", wrong)


def inject_nan(monkeypatch, triton_kernels):
    attention = triton_kernels.attention

    def with_nan(*args, **kwargs):
        out = attention(*args, **kwargs)
        out = kwargs.get("out", out)
        out[0, 0, -1, 0] = float("nan")
        return out

    monkeypatch.setattr(triton_kernels, "attention", with_nan)


def inject_import_error(monkeypatch, triton_kernels):
    """A triton that does not import (e.g. built for another torch): the backend imports its
    kernels at first use, inside the check."""
    import sys

    import dca

    monkeypatch.setitem(sys.modules, "dca.triton_kernels", None)
    monkeypatch.delattr(dca, "triton_kernels")


FAILURES = [
    (inject_import_error, "step 1 (100 new tokens after 0): ModuleNotFoundError: import of dca.triton_kernels"),
    (inject_compile_error, "CompilationError: <source unavailable> ptxas fatal"),
    (inject_wrong_result, "attention off by"),
    (inject_nan, "non-finite values"),
]


@pytest.mark.parametrize("inject, finding", FAILURES, ids=["import-error", "compile-error", "wrong-result", "nan"])
def test_a_failing_check_falls_back_to_torch_and_every_document_completes(gpu_like, monkeypatch, caplog, inject,
                                                                           finding):
    inject(monkeypatch, gpu_like)
    batch, mask = two_documents()
    expected = generate(apply_dca(tiny_model(), TORCH), batch, mask)
    model = apply_dca(tiny_model(), AUTO)
    with caplog.at_level(logging.INFO, logger="dca"):
        out = generate(model, batch, mask)  # the first forward chooses, checks and falls back
    assert torch.equal(out, expected)  # both documents, the same tokens as the torch backend
    report = backend_report(model)
    assert (report.requested, report.chosen, report.ran, report.checked) == ("auto", "triton", "torch", True)
    assert report.fallback_reason.startswith("triton: step ") and finding in report.fallback_reason
    records = dca_records(caplog)
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    line = records[0].getMessage()
    assert "\n" not in line and "'triton' failed its start-up self-check on cpu (float64, KV auto)" in line
    assert "running 'torch' instead" in line and finding in line

    # a second model of the process reuses the finding: same report, no second line
    other = apply_dca(tiny_model(seed=2), AUTO)
    with caplog.at_level(logging.INFO, logger="dca"):
        other(ids(5), use_cache=True)
    assert backend_report(other).fallback_reason == report.fallback_reason and len(dca_records(caplog)) == 1

    # asked for by name, the same finding is an error at start
    with pytest.raises(BackendUnavailable, match="'triton' failed its start-up self-check") as error:
        prepare_backend(apply_dca(tiny_model(), TRITON))
    assert finding in str(error.value)
    with pytest.raises(BackendUnavailable, match="self-check"):  # and at the first forward without prepare
        apply_dca(tiny_model(), TRITON)(ids(5))


@needs_interpreter
def test_int8_is_checked_with_an_int8_cache(gpu_like, monkeypatch):
    """The store kernel's int8 path is part of the check: a NaN written into an int8 cache's
    scales fails it for KV int8 only."""
    store = gpu_like.store

    def nan_scales(key, value, k_buf, v_buf, cos, sin, row_start, write_start, chunk_len, k_scale=None, v_scale=None):
        store(key, value, k_buf, v_buf, cos, sin, row_start, write_start, chunk_len, k_scale, v_scale)
        if k_scale is not None:
            k_scale[0, 0, int(write_start[0])] = float("nan")

    monkeypatch.setattr(gpu_like, "store", nan_scales)
    model = apply_dca(tiny_model(), AUTO)
    assert prepare_backend(model).ran == "triton"
    int8 = prepare_backend(model, kv_dtype="int8")
    assert int8.ran == "torch" and "non-finite" in int8.fallback_reason


@needs_interpreter
def test_a_wrong_packed_kernel_fails_the_check(gpu_like, monkeypatch):
    """The packed kernels (continuous batching: one store and one attention launch per layer for
    all rows) are part of the check: a packed attention off by 1% makes "auto" fall back, found
    at the packed step."""
    packed_attention = gpu_like.packed_attention

    def off(*args, **kwargs):
        return packed_attention(*args, **kwargs).mul_(1.01)

    monkeypatch.setattr(gpu_like, "packed_attention", off)
    report = prepare_backend(apply_dca(tiny_model(), AUTO))
    assert report.ran == "torch" and report.checked
    assert report.fallback_reason.startswith("triton: packed step 1 (100 and 47 new tokens after 0 and 0): row 0's "
                                             "attention off by 1.00e-02")


# --- the Triton path on the engine's row caches ------------------------------------------------


@needs_interpreter
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_packed_rows_of_row_caches_are_written_in_place_never_dequantised(monkeypatch, kv_dtype):
    """pipeline.engine's RowKV (slot layout): on Triton the cache-write kernel writes its storage
    and the attention kernels read it; its `update` (which returns the whole row, dequantised for
    int8) is never called. Same values as the torch backend through `update`."""
    from pipeline.engine.kv_cache import PackedRows, RowKV

    from dca import kv_quant

    def run(config, count_updates):
        model = apply_dca(tiny_model(), config)
        rows = [RowKV(2, 64, kv_dtype) for _ in range(3)]
        for row, n in zip(rows, (30, 45, 7)):
            row.dca_prompt_length = torch.tensor([n])
        steps = [[(0, 30), (1, 45), (2, 7)], [(0, 1), (1, 1), (2, 1)], [(0, 1), (1, 1), (2, 2)]]
        logits = []
        for step, segments in enumerate(steps):
            tokens = torch.cat([ids(n, seed=10 * step + r) for r, n in segments], dim=1)
            at, packed = 0, []
            for r, n in segments:
                packed.append((rows[r], at, at + n))
                at += n
            positions = torch.cat([torch.arange(rows[r].length, rows[r].length + n) for r, n in segments])[None]
            logits.append(model(tokens, position_ids=positions, cache=PackedRows(packed), use_cache=True).logits)
        return logits, rows

    calls = {"update": 0, "dequantize": 0}
    update, dequantize = RowKV.update, kv_quant.dequantize_int8

    def counting_update(self, key, *args, **kwargs):
        calls["update"] += key.shape[-2] > 0  # a zero-token update only allocates the slot
        return update(self, key, *args, **kwargs)

    def counting_dequantize(data, *args, **kwargs):
        calls["dequantize"] += data.shape[-2] > 0  # (the zero-token update dequantises nothing)
        return dequantize(data, *args, **kwargs)

    expected, _ = run(TORCH, False)
    monkeypatch.setattr(RowKV, "update", counting_update)
    monkeypatch.setattr(kv_quant, "dequantize_int8", counting_dequantize)
    got, rows = run(TRITON, True)
    assert calls == {"update": 0, "dequantize": 0}
    assert [row.length for row in rows] == [32, 47, 10]
    for g, e in zip(got, expected):
        assert_close(g, e, rtol=1e-9, atol=1e-9)


@needs_interpreter
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_packed_rows_run_in_one_store_and_one_attention_launch_per_layer(monkeypatch, kv_dtype):
    """Issue 18: on Triton, a packed forward whose rows' caches are written in place (the engine's
    RowKV) is one `packed_store` and one `packed_attention` per layer over all rows, never the
    per-row kernels; prompt rows and decode rows of different pasts (a row joining mid-way), int8
    and model-dtype storage: the torch backend's logits, and each row's lengths as it leaves them."""
    from pipeline.engine.kv_cache import PackedRows, RowKV

    from dca import triton_kernels

    layers = 2
    prompts = (30, 45, 7)
    steps = [[(0, 30), (1, 45)], [(0, 1), (1, 1), (2, 7)], [(0, 1), (1, 1), (2, 1)], [(2, 1), (0, 1)]]

    def run(config, on_forward=None):
        model = apply_dca(tiny_model(), config)
        rows = [RowKV(layers, 64, kv_dtype) for _ in prompts]
        for row, n in zip(rows, prompts):
            row.dca_prompt_length = torch.tensor([n])
        logits = []
        for step, segments in enumerate(steps):
            tokens = torch.cat([ids(n, seed=10 * step + r) for r, n in segments], dim=1)
            at, packed = 0, []
            for r, n in segments:
                packed.append((rows[r], at, at + n))
                at += n
            positions = torch.cat([torch.arange(rows[r].length, rows[r].length + n) for r, n in segments])[None]
            logits.append(model(tokens, position_ids=positions, cache=PackedRows(packed), use_cache=True).logits)
            if on_forward is not None:
                on_forward()
        return logits, rows

    expected, torch_rows = run(TORCH)

    calls = {name: 0 for name in ("packed_store", "packed_attention", "store", "attention", "prefill", "decode")}

    def counted(name):
        original = getattr(triton_kernels, name)

        def call(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(triton_kernels, name, call)

    for name in calls:
        counted(name)
    per_forward = []

    def record():
        per_forward.append(dict(calls))
        calls.update({name: 0 for name in calls})

    got, rows = run(TRITON, record)
    one_per_layer = {"packed_store": layers, "packed_attention": layers, "store": 0, "attention": 0, "prefill": 0,
                     "decode": 0}
    assert per_forward == [one_per_layer] * len(steps)
    assert [row.lengths for row in rows] == [row.lengths for row in torch_rows] == [[33, 33], [47, 47], [9, 9]]
    for g, e in zip(got, expected):
        assert_close(g, e, rtol=1e-9, atol=1e-9)


def test_a_backend_is_chosen_once_per_device_dtype_and_kv_dtype(monkeypatch):
    from dca import backends

    calls = []
    select = selfcheck.select

    def counting(*args):
        calls.append(args[1])
        return select(*args)

    monkeypatch.setattr(selfcheck, "select", counting)
    model = apply_dca(tiny_model(), TINY_DCA)
    from dca.kv_quant import Int8KVCache

    for _ in range(3):
        model(ids(10), use_cache=True)
        model(ids(10), cache=Int8KVCache(), use_cache=True)
    assert [key.kv_dtype for key in calls] == ["auto", "int8"]
    assert {type(b) for b in model.model.layers[0].self_attn.dca_state.backends.values()} == {TorchBackend}


# --- per-cache state off the cache objects -----------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_no_attribute_is_set_on_the_caches(backend, request):
    from transformers import DynamicCache

    from dca import set_prompt_length
    from dca.prefill import chunked_prefill

    if backend == "triton":
        request.getfixturevalue("one_torch_thread")
    model = apply_dca(tiny_model(), dataclasses.replace(AUTO, backend=backend))
    cache = DynamicCache()
    before = set(vars(cache))
    set_prompt_length(cache, 40)
    chunked_prefill(model, ids(30), cache, block_size=20)
    model(ids(1), cache=cache, use_cache=True)
    assert set(vars(cache)) == before
    assert type(cache.layers[0]).__name__ == ("StaticKVLayer" if backend == "triton" else "DynamicLayer")


def test_cache_state_goes_with_its_cache():
    import gc

    from transformers import DynamicCache

    from dca.state import _STATES, cache_state, prompt_length_of

    cache = DynamicCache()
    state = cache_state(cache)
    assert cache_state(cache) is state and prompt_length_of(cache) is None
    count = len(_STATES)
    del cache
    gc.collect()
    assert len(_STATES) == count - 1


@needs_interpreter
@pytest.mark.usefixtures("one_torch_thread")
def test_a_copied_static_cache_keeps_its_row_starts():
    """StaticKVCache carries its DCA state as a field: a deep copy decodes its left-padded rows
    without a mask, as the original does."""
    from dca.cache import StaticKVCache
    from dca.prefill import chunked_prefill

    model = apply_dca(tiny_model(), TRITON)
    batch, mask = left_pad([ids(25, seed=1), ids(9, seed=2)])
    cache = StaticKVCache(max_tokens=30)
    chunked_prefill(model, batch, cache, attention_mask=mask)
    twin = copy.deepcopy(cache)
    step = ids(1, batch=2, seed=9)
    assert_close(model(step, cache=twin, use_cache=True).logits, model(step, cache=cache, use_cache=True).logits,
                 rtol=0, atol=0)


def test_the_triton_backend_requires_left_padding_and_torch_does_not():
    assert TritonBackend.left_padding_only and not TorchBackend.left_padding_only


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_a_model_that_ran_stays_deep_copyable(backend, request):
    if backend == "triton":
        request.getfixturevalue("one_torch_thread")
    model = apply_dca(tiny_model(), dataclasses.replace(AUTO, backend=backend))
    x = ids(30)
    want = model(x).logits
    twin = copy.deepcopy(model)
    assert_close(twin(x).logits, want, rtol=0, atol=0)
    assert backend_report(twin) == backend_report(model)


@needs_interpreter
@pytest.mark.usefixtures("one_torch_thread")
def test_the_check_runs_without_a_model_for_scripts(monkeypatch):
    result = selfcheck.run_for("triton", "cpu", torch.float32, "int8", geometry=(4, 2, 16))
    assert result.passed and result.reason is None and result.seconds > 0
    from dca import triton_kernels

    inject_nan(monkeypatch, triton_kernels)
    result = selfcheck.run_for("triton", "cpu", torch.float32, "int8", geometry=(4, 2, 16))
    assert not result.passed and result.reason.startswith("step 1 (100 new tokens after 0): non-finite")
