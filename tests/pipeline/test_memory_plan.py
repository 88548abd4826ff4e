"""The memory planner (pipeline/engine/memory_plan.py) and its CLI (jobs/plan.py)."""

import json
import subprocess
import sys
import weakref

import pytest

from jobs import plan as plan_cli
from pipeline.engine.memory_plan import GiB, KiB, MiB, MemoryPlan, ModelShape, ServingConfig, WontFit, parse_bytes
from pipeline.engine.requests import WONT_FIT

A100_80G = parse_bytes("a100-80g")
LLAMA2_70B = ModelShape.load("llama2-70b")


def plan70(**kw):
    values = dict(tp_size=2, device_memory=A100_80G)
    values.update(kw)
    return MemoryPlan(LLAMA2_70B, ServingConfig(**values))


def test_llama2_70b_numbers_of_the_issue():
    assert LLAMA2_70B.num_parameters == pytest.approx(68.98e9, rel=1e-3)
    p = plan70()
    # ~64 GiB of bf16 weights per GPU at tp=2 (embedding replicated, the rest split)
    assert p.weight_bytes() / GiB == pytest.approx(64.5, abs=0.1)
    # 320 KiB of bf16 KV per token for the model, half of it per GPU
    assert p.kv_bytes_per_token() == 160 * KiB
    assert p.kv_cache_bytes(100_000) / GiB == pytest.approx(15.26, abs=0.01)
    # int8 + a float32 scale per (token, head): (128 + 4) / 256 of bf16
    assert plan70(kv_dtype="int8").kv_bytes_per_token() == 160 * KiB * 132 / 256


def test_the_100k_plan():
    request = dict(prompt_tokens=100_000, new_tokens=512)
    assert plan70(kv_dtype="int8", prefill_block="chunk").estimate(**request).fits
    assert not plan70(kv_dtype="auto", prefill_block="chunk").estimate(**request).fits
    assert not plan70(kv_dtype="int8", prefill_block=None).estimate(**request).fits
    assert not plan70(kv_dtype="auto", prefill_block=None, logits="all").estimate(**request).fits


def test_chunked_prefill_activations_depend_on_the_block_not_the_prompt():
    p = plan70(prefill_block="chunk")
    short, long = p.estimate(20_000, 0), p.estimate(100_000, 0)
    # Only the one-layer transient of appending to the cache grows with the prompt.
    one_layer_kv = p.kv_bytes_per_token() / LLAMA2_70B.num_layers * 80_000
    assert long.activations - short.activations <= one_layer_kv + 1
    one_shot = plan70(prefill_block=None)
    assert one_shot.estimate(100_000, 0).activations > 4 * one_shot.estimate(20_000, 0).activations


def test_check_raises_wont_fit_with_the_numbers():
    p = plan70(kv_dtype="auto")
    assert p.check(20_000, 512).fits
    with pytest.raises(WontFit) as info:
        p.check(100_000, 512)
    err = info.value
    assert err.error_type == WONT_FIT == "wont_fit"
    assert err.estimate.total > A100_80G
    assert "100000 prompt tokens" in str(err) and "GiB" in str(err) and str(err.longest_prompt) in str(err)
    assert p.fits(err.longest_prompt, 512) and not p.fits(err.longest_prompt + 1, 512)
    assert err.to_dict()["error_type"] == "wont_fit"


def test_memory_grows_with_prompt_batch_and_new_tokens():
    p = plan70(kv_dtype="int8")
    totals = [p.estimate(n, 512).total for n in (1, 1000, 10_000, 100_000)]
    assert totals == sorted(totals)
    assert p.estimate(10_000, 512, batch=2).total > p.estimate(10_000, 512).total
    assert p.estimate(10_000, 512).total > p.estimate(10_000, 0).total
    assert p.longest_prompt(512, batch=2) < p.longest_prompt(512)


def test_more_gpus_and_smaller_dtypes_reach_longer_prompts():
    base = plan70(kv_dtype="auto").longest_prompt(512)
    assert plan70(kv_dtype="int8").longest_prompt(512) > base
    assert plan70(kv_dtype="auto", tp_size=4).longest_prompt(512) > base
    assert plan70(kv_dtype="auto", weight_dtype="int8").longest_prompt(512) > base


def test_nothing_fits_when_the_weights_do_not():
    p = MemoryPlan(LLAMA2_70B, ServingConfig(tp_size=1, device_memory=A100_80G))
    assert p.longest_prompt(512) == 0
    with pytest.raises(WontFit):
        p.check(1, 1)


def test_uneven_head_split_plans_for_the_larger_rank():
    smol = ModelShape.load("smollm2")  # 9 heads, 3 kv heads: tp=2 -> 5 + 4 heads, 2 + 1 kv heads
    p = MemoryPlan(smol, ServingConfig(tp_size=2))
    assert (p.q_heads, p.kv_heads) == (5, 2)


def test_shapes_from_dict_config_object_and_directory(tmp_path):
    values = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 96, "vocab_size": 101, "max_position_embeddings": 32}
    shape = ModelShape.from_config(values)
    assert shape.head_dim == 16 and shape.num_kv_heads == 2 and shape.pretraining_length == 32
    from transformers import LlamaConfig

    assert ModelShape.from_config(LlamaConfig(**values)).num_parameters == shape.num_parameters
    (tmp_path / "config.json").write_text(json.dumps(values))
    assert ModelShape.load(str(tmp_path)).num_layers == 2
    with pytest.raises(FileNotFoundError, match="not a preset"):
        ModelShape.load(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="lacks"):
        ModelShape.from_config({"hidden_size": 64})


def test_parameter_count_matches_transformers():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    values = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, vocab_size=101, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**values))
    assert ModelShape.from_config(values).num_parameters == sum(p.numel() for p in model.parameters())


def test_config_validation_and_byte_parsing():
    with pytest.raises(ValueError, match="kv_dtype"):
        ServingConfig(kv_dtype="int4")
    with pytest.raises(ValueError, match="prefill_block"):
        ServingConfig(prefill_block=0)
    with pytest.raises(ValueError, match="tp_size"):
        ServingConfig(tp_size=0)
    assert ServingConfig(weight_dtype="int8").compute_dtype == "bfloat16"
    assert parse_bytes("80GiB") == 80 * GiB and parse_bytes("40GB") == 40 * 10**9
    assert parse_bytes("512 MiB") == 512 * MiB and parse_bytes("A100-80G") == A100_80G
    with pytest.raises(ValueError, match="cannot read memory size"):
        parse_bytes("eighty")
    with pytest.raises(ValueError, match="device_memory"):
        MemoryPlan(LLAMA2_70B, ServingConfig()).fits(10)


def test_cli_table_compare_and_json(capsys):
    assert plan_cli.main(["--model", "llama2-70b", "--tp", "2", "--gpu-memory", "a100-80g", "--kv-dtype", "int8"]) == 0
    out = capsys.readouterr().out
    assert "kv_cache" in out and "-> fits" in out and "longest prompt" in out
    assert plan_cli.main(["--model", "llama2-70b", "--tp", "2", "--gpu-memory", "80GiB", "--compare"]) == 0
    out = capsys.readouterr().out
    assert out.count("| bf16 weights") == 7  # Triton (the default on CUDA), then flash-attn and torch
    assert "DCA attention triton unless a row says otherwise" in out
    assert "flash-attn attention (Triton's fallback)" in out and "torch attention (no Triton, no flash-attn)" in out
    assert plan_cli.main(["--model", "llama2-7b", "--gpu-memory", "40GB", "--prefill-block", "none", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["serving"]["prefill_block"] is None and data["longest_prompt"] > 0 and data["fits"] in (True, False)
    assert plan_cli.main(["--model", "no-such-model"]) == 2
    assert "not a preset" in capsys.readouterr().err


def test_triton_plans_without_key_copies_dequantised_layers_or_chunk_partials():
    """70B at tp 2, int8 KV, chunked prefill, on an A100: the Triton backend writes keys into the
    cache in place and reads int8 in its kernels, so its attention transient does not grow with
    the keys; flash-attn dequantises the layer (2 x keys x Hkv x D, bf16), torch on CUDA also
    copies key ranges. Bounds from those terms, not from the planner's own formula."""
    def plan(backend):
        return plan70(kv_dtype="int8", prefill_block="chunk", attention_backend=backend, device="cuda")

    triton, flash, torch_ = plan("triton"), plan("flash"), plan("torch")
    hq, hkv, d = 32, 4, 128  # per rank at tp 2
    # Decode of one token: Triton holds at most 256 split partial outputs + LSEs in float32.
    partials = 256 * (hq * d + hq) * 4  # 4.03 MiB
    for keys in (20_000, 100_000):
        decode = triton.activation_bytes(1, keys)
        assert partials < decode < partials + 1 * MiB
        dequantised = 2 * keys * hkv * d * 2
        assert flash.activation_bytes(1, keys) >= dequantised
        copies = 2 * (keys - 2 * flash.chunk_len) * hkv * d * 2  # torch on CUDA: key ranges made contiguous
        assert torch_.activation_bytes(1, keys) > flash.activation_bytes(1, keys) + 0.9 * copies
    assert triton.activation_bytes(1, 20_000) == triton.activation_bytes(1, 100_000)  # 256 splits either way
    assert triton.activation_bytes(1, 64) < 256 * KiB  # one key block, one split: the MLP (150 KiB) bounds it
    # Prefill (the last block of a 100k prompt): the MLP bounds Triton's peak, not the keys.
    block = triton.block_size(100_000)
    assert triton.activation_bytes(block, 20_000) == triton.activation_bytes(block, 100_000)
    # MLP phase: act(gate), up and their product (intermediate 28672 / 2 per rank) and 4 hidden
    # states (8192, replicated), bf16.
    mlp = 3 * block * 28672 // 2 * 2 + 4 * block * 8192 * 2
    assert mlp < triton.activation_bytes(block, 100_000) < 1.05 * mlp
    grows = flash.activation_bytes(block, 100_000) - flash.activation_bytes(block, 20_000)
    assert grows >= 2 * 80_000 * hkv * d * 2  # the dequantised layer
    # So Triton needs the least memory and reaches the longest prompt; the KV cache is the same.
    estimates = [p.estimate(100_000, 512) for p in (triton, flash, torch_)]
    assert estimates[0].kv_cache == estimates[1].kv_cache == estimates[2].kv_cache
    assert estimates[0].activations < estimates[1].activations < estimates[2].activations
    assert estimates[1].activations - estimates[0].activations >= 2 * 100_000 * hkv * d * 2
    longest = [p.longest_prompt(512) for p in (triton, flash, torch_)]
    assert longest[0] > longest[1] > longest[2] > 100_000


def test_planned_backend_is_what_dca_resolves_to():
    from pipeline.config.resolve import planned_attention_backend as planned

    assert planned("cuda") == "triton" and planned("cuda", dtype="float32") == "triton"
    assert planned("cuda", triton_available=False) == "flash"
    assert planned("cuda", dtype="float32", triton_available=False) == "torch"  # flash-attn: half types only
    assert planned("cuda", triton_available=False, flash_available=False) == "torch"
    assert planned("cpu") == "torch"
    for name in ("torch", "flash", "triton"):  # asked for by name: planned as asked (or the job stops)
        assert planned("cuda", name) == planned("cpu", name) == name
    with pytest.raises(ValueError, match="DCA backend"):
        planned("cuda", "cutlass")


def test_cli_plans_for_the_backend_the_job_would_run(capsys):
    def serving(*flags):
        status = plan_cli.main(["--model", "llama2-70b", "--tp", "2", "--gpu-memory", "a100-80g", "--json",
                                "--kv-cache-dtype", "int8", *flags])
        plan = json.loads(capsys.readouterr().out)
        assert status == (0 if plan["fits"] else 1)
        return plan

    by_default = serving("--device", "cuda")
    assert by_default["serving"]["attention_backend"] == "triton"  # the job's "auto" on CUDA
    assert serving()["serving"]["attention_backend"] == "triton"  # --device auto plans for GPUs
    on_cpu = serving("--device", "cpu")
    assert on_cpu["serving"]["attention_backend"] == "torch" and on_cpu["fits"] is False  # fp32 70B weights
    assert serving("--device", "cuda", "--dca-backend", "flash")["serving"]["attention_backend"] == "flash"
    flash = serving("--device", "cuda", "--attention-backend", "flash")
    triton = serving("--device", "cuda", "--attention-backend", "triton")
    assert flash["serving"]["attention_backend"] == "flash" and triton == by_default
    assert triton["activations"] < flash["activations"] and triton["longest_prompt"] > flash["longest_prompt"]


def test_planner_and_cli_import_no_torch():
    code = "import sys, pipeline.engine.memory_plan, jobs.plan; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the prediction against the live tensors of a real run -------------------------------------


class _LiveTensorPeak:
    """Peak bytes of tensor storages created inside the context and still alive (what
    torch.cuda.max_memory_allocated counts on a GPU, without allocator rounding)."""

    def __enter__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self
        self.live, self.current, self.peak = {}, 0, 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        storage = t.untyped_storage()
                        key = storage.data_ptr()
                        if key and key not in tracker.live:
                            tracker.live[key] = storage.nbytes()
                            tracker.current += storage.nbytes()
                            weakref.finalize(storage, tracker._free, key)
                tracker.peak = max(tracker.peak, tracker.current)
                return out

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def _free(self, key):
        self.current -= self.live.pop(key, 0)

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


@pytest.mark.parametrize("block, kv", [(None, "float32"), (160, "float32"), (160, "int8"), (64, "float32")])
def test_prediction_within_15_percent_of_the_live_tensor_peak(block, kv):
    import torch
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from dca import DCAConfig, apply_dca
    from dca.kv_quant import Int8KVCache
    from dca.prefill import chunked_prefill

    shape = ModelShape(num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32,
                       intermediate_size=384, vocab_size=512, pretraining_length=256)
    prompt, new = 1200, 4
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=256, tie_word_embeddings=False,
    )).eval()
    apply_dca(model, DCAConfig(pretraining_length=256, backend="torch"))
    ids = torch.randint(1, 512, (1, prompt))
    cache = Int8KVCache() if kv == "int8" else DynamicCache()
    with torch.inference_mode(), _LiveTensorPeak() as live:
        logits = chunked_prefill(model, ids, cache, block_size=block or prompt)
        for _ in range(new):
            logits = model(logits.argmax(-1, keepdim=True), cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    plan = MemoryPlan(shape, ServingConfig(weight_dtype="float32", kv_dtype=kv, prefill_block=block,
                                           attention_backend="torch", device="cpu"))
    e = plan.estimate(prompt, new)
    predicted = e.kv_cache + e.activations + e.logits
    assert predicted == pytest.approx(live.peak, rel=0.15), (predicted / MiB, live.peak / MiB)


def test_kv_cache_dtype_is_the_jobs_name_and_kv_dtype_still_works():
    assert ServingConfig(kv_cache_dtype="int8").resolved_kv_dtype == "int8"
    assert ServingConfig(kv_dtype="int8") == ServingConfig(kv_cache_dtype="int8")
    assert "kv_dtype" not in ServingConfig().to_dict() and ServingConfig().to_dict()["kv_cache_dtype"] == "auto"
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        ServingConfig(kv_cache_dtype="fp8")


@pytest.mark.parametrize("p, s, w", [(8192, None, None), (4096, None, None), (4096, 3072, 512), (64, 48, 8),
                                     (100, None, 30)])
def test_planner_chunk_len_is_dca_chunk_len(p, s, w):
    from dca import DCAConfig
    from pipeline.config.model import dca_chunk_len

    assert dca_chunk_len(p, s, w) == DCAConfig(pretraining_length=p, chunk_size=s, local_window=w).chunk_len
    with pytest.raises(ValueError, match="local_window"):
        dca_chunk_len(p, s, p)


def test_auto_prefill_block_is_the_engines():
    from pipeline.config.resolve import MIN_AUTO_PREFILL_TOKENS
    from pipeline.config.resolve import MIN_AUTO_PREFILL_TOKENS as AUTO_PREFILL_MIN_TOKENS

    assert AUTO_PREFILL_MIN_TOKENS == MIN_AUTO_PREFILL_TOKENS
    smol = ModelShape.load("smollm2")  # chunk_len 5120
    assert MemoryPlan(smol, ServingConfig(prefill_block="auto")).block_size(20000) == 5120
    tiny = ModelShape(num_layers=1, hidden_size=8, num_heads=1, num_kv_heads=1, head_dim=8, intermediate_size=8,
                      vocab_size=16, pretraining_length=64)  # chunk_len 40
    assert MemoryPlan(tiny, ServingConfig(prefill_block="auto")).block_size(5000) == 1024
    assert MemoryPlan(tiny, ServingConfig(prefill_block="chunk")).block_size(5000) == 40


def test_cli_exits_1_on_a_plan_that_does_not_fit(capsys):
    """Scripts can tell: DOES NOT FIT is exit 1, a plan that fits (or has no device to check) 0."""
    flags = ["--model", "smollm2", "--device", "cpu", "--max-input-tokens"]
    assert plan_cli.main([*flags, "20000000", "--gpu-memory", "24GiB"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert plan_cli.main([*flags, "32768", "--gpu-memory", "24GiB"]) == 0
    assert "-> fits" in capsys.readouterr().out
    assert plan_cli.main([*flags, "20000000"]) == 0  # nothing to check against
    capsys.readouterr()
    assert plan_cli.main([*flags, "20000000", "--gpu-memory", "24GiB", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["fits"] is False


def test_a_job_refuses_a_max_input_tokens_its_own_plan_cannot_fit():
    """20,000,000 tokens need ~873 GiB per rank (the embedded model, CPU plan): refused before the
    output is claimed, in one line naming the longest prompt that fits, which the planner agrees
    does fit and one more thousand tokens does not."""
    from pipeline.runtime.pool import PlanDoesNotFit, check_plan_fits

    machine = (24 * GiB, "a 24 GiB test machine")
    with pytest.raises(PlanDoesNotFit) as refused:
        check_plan_fits(_job_config(20_000_000), machine)
    message = str(refused.value)
    assert "\n" not in message and "--max-input-tokens 20000000 cannot fit" in message
    assert "24.00 GiB (a 24 GiB test machine)" in message and "GiB per rank" in message
    longest = int(message.split("the longest prompt that fits is ")[1].split(" ")[0])
    assert 100_000 < longest < 20_000_000
    check_plan_fits(_job_config(longest), machine)
    with pytest.raises(PlanDoesNotFit):
        check_plan_fits(_job_config(longest + 1000), machine)


def test_a_job_on_this_machine_checks_its_plan_against_its_memory(monkeypatch):
    """No device_memory given: the check uses what one rank has here (CPU: this machine's memory
    over its ranks), so the default settings pass and an absurd prompt is refused; on a remote
    cluster whose device is not known before Ray starts, nothing is refused here."""
    from pipeline.runtime.pool import PlanDoesNotFit, check_plan_fits, local_device_memory

    memory, where = local_device_memory("cpu", ranks=2)
    assert 0 < memory and "over 2 rank(s)" in where
    check_plan_fits(_job_config(32768, device="cpu"))
    with pytest.raises(PlanDoesNotFit):
        check_plan_fits(_job_config(2_000_000_000, device="cpu"))
    monkeypatch.setenv("RAY_ADDRESS", "ray://elsewhere:10001")
    check_plan_fits(_job_config(2_000_000_000, device=None))


def _job_config(max_input_tokens: int, device: str | None = "cpu"):
    from pipeline.config.job import JobConfig
    from pipeline.config.model import ModelSpec

    return JobConfig(task="summarize", input_path="in", output_dir="/tmp/out", model_spec=ModelSpec(),
                     max_input_tokens=max_input_tokens, max_new_tokens=256, device=device)


def test_cli_estimates_a_split_document(capsys):
    """jobs.plan --truncation hierarchical --document-tokens N: sections, levels and calls, every
    call within --max-input-tokens; --document-tokens without the policy is a usage error."""
    flags = ["--model", "smollm2", "--device", "cpu", "--max-input-tokens", "4096", "--max-new-tokens", "256"]
    assert plan_cli.main([*flags, "--truncation", "hierarchical", "--document-tokens", "300000", "--json"]) == 0
    split = json.loads(capsys.readouterr().out)["hierarchical"]
    assert split == {"document_tokens": 300000, "section_tokens": 3896, "sections": 78, "levels": 3, "calls": 85}
    assert plan_cli.main([*flags, "--truncation", "hierarchical", "--document-tokens", "300000", "--task", "qa"]) == 0
    assert "at least 78 sections" in capsys.readouterr().out
    # --qa-combine confidence: the section calls only.
    assert plan_cli.main([*flags, "--truncation", "hierarchical", "--document-tokens", "300000", "--task", "qa",
                          "--qa-combine", "confidence", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hierarchical"] == {
        "document_tokens": 300000, "section_tokens": 3896, "sections": 78, "levels": 1, "calls": 78}
    assert plan_cli.main([*flags, "--document-tokens", "300000"]) == 2
    assert "needs --truncation hierarchical" in capsys.readouterr().err
