"""The evaluation harness (evaluation/, jobs/evaluate.py) on a tiny random Llama.

A character-level tokenizer keeps prompt arithmetic exact and needs no files.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest
import torch

import evaluation as ev


class CharTokenizer:
    """One token per character (ids = code point + 2, capped), optional BOS id 1, pad/eos id 0."""

    pad_token_id = 0
    eos_token_id = 0
    vocab_size = 258

    def __init__(self, bos: bool = False):
        self.bos = bos

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, text, add_special_tokens=True):
        ids = [min(ord(c), 255) + 2 for c in text]
        return {"input_ids": ([1] if self.bos and add_special_tokens else []) + ids}

    def decode(self, ids, skip_special_tokens=True):
        ids = [int(i) for i in ids]
        return "".join(chr(i - 2) for i in ids if i >= 2)


def tiny_llama(max_position_embeddings=512, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=CharTokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
        # Wide weights: with the default 0.02 the attention is nearly uniform, positions barely
        # matter, and DCA moves the loss by ~1e-6, float32 rounding's size. At 0.2 it moves it by
        # ~1e-2 (test_run_reuses_results_dca_provably_shares relies on the margin).
        initializer_range=0.2,
        pad_token_id=0, eos_token_id=0, bos_token_id=1, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


# ---------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_passkey_prompt_places_key_at_requested_depth(depth, bos):
    tok = CharTokenizer(bos=bos)
    length = 1000
    prompt = ev.build_passkey_prompt(tok, length, depth, "12345", kind="repeat")
    assert len(prompt.input_ids) == length
    text = tok.decode(prompt.input_ids)
    needle = ev.PASSKEY_NEEDLE.format(key="12345")
    head = len(tok(ev.PASSKEY_INSTRUCTION)["input_ids"])  # BOS included when the tokenizer adds one
    if bos:
        assert prompt.input_ids[0] == 1
    assert text.count("12345") == 2  # the needle says it twice, nowhere else
    # The needle starts exactly at needle_start, and the filler before it is `depth` of all filler.
    start = prompt.needle_start
    assert tok.decode(prompt.input_ids[start : start + len(needle)]) == needle
    budget = length - head - len(needle) - len(ev.PASSKEY_QUESTION)
    assert start - head == round(depth * budget)
    assert abs(prompt.depth - depth) <= 1 / budget
    assert text.startswith(ev.PASSKEY_INSTRUCTION)
    assert text.endswith(ev.PASSKEY_QUESTION)


def test_passkey_prompt_with_book_filler_is_real_text_and_seeded():
    tok = CharTokenizer()
    book_ids = {"alice29.txt": tok(ev.read_book("alice29.txt"), add_special_tokens=False)["input_ids"]}
    a = ev.build_passkey_prompt(tok, 2000, 0.5, "55555", kind="book", seed=0, book_ids=book_ids)
    b = ev.build_passkey_prompt(tok, 2000, 0.5, "55555", kind="book", seed=0, book_ids=book_ids)
    c = ev.build_passkey_prompt(tok, 2000, 0.5, "55555", kind="book", seed=1, book_ids=book_ids)
    assert a.input_ids == b.input_ids and a.input_ids != c.input_ids
    text = tok.decode(a.input_ids)
    book = ev.read_book("alice29.txt")
    before = text[len(ev.PASSKEY_INSTRUCTION) : a.needle_start]
    after = text[a.needle_start + len(ev.PASSKEY_NEEDLE.format(key="55555")) : -len(ev.PASSKEY_QUESTION)]
    assert len(before) > 500 and len(after) > 500
    assert before + after in book  # one contiguous span of the book, cut where the needle goes


def test_passkey_prompt_too_short_is_an_actionable_error():
    with pytest.raises(ValueError, match="too short"):
        ev.build_passkey_prompt(CharTokenizer(), 50, 0.5, "12345")


def test_passkey_keys_are_five_digits_and_seeded():
    keys = {ev.make_passkey(s) for s in range(20)}
    assert all(len(k) == 5 and k.isdigit() for k in keys)
    assert ev.make_passkey(3) == ev.make_passkey(3) and len(keys) > 15


@pytest.mark.parametrize(
    "answer, correct",
    [
        (" 12345.", True),
        ("12345", True),
        (" The pass key is 12345. Remember", True),
        (" 123456", False),
        (" 1234", False),
        (" 54321 and 12345", False),
        (" twelve thousand", False),
        ("", False),
        (" 12,345", False),
    ],
)
def test_exact_match_scoring(answer, correct):
    assert ev.passkey_correct(answer, "12345") is correct


# ---------------------------------------------------------------------------- perplexity


def _direct_nll(model, ids):
    logits = model(torch.tensor([ids])).logits[0, :-1].float()  # (n-1, V): fine for a short text
    return torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")


@pytest.mark.parametrize("use_dca", [False, True])
def test_perplexity_equals_direct_computation(use_dca):
    from dca import DCAConfig, apply_dca

    model = tiny_llama(max_position_embeddings=32)
    if use_dca:  # 101 tokens over chunks of 20: the DCA remapping is active
        apply_dca(model, DCAConfig(pretraining_length=32, chunk_size=24, local_window=4))
    tok = CharTokenizer()
    ids = tok(ev.read_book("alice29.txt")[5000:5101])["input_ids"]
    n = len(ids)
    with torch.no_grad():
        direct = _direct_nll(model, ids)
        sliced = ev.sequence_nll(model, ids, loss_slice=7)  # slices that do not divide n - 1
        full_loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    torch.testing.assert_close(sliced, direct, rtol=1e-5, atol=1e-5)
    summary = ev.perplexity_summary(sliced, n, position_bucket=25)
    assert summary["ppl"] == pytest.approx(math.exp(float(full_loss)), rel=1e-5)
    last = direct[n - n // 4 - 1 :]  # targets at positions >= 3n/4
    assert len(last) == n // 4
    assert summary["ppl_last_quarter"] == pytest.approx(math.exp(float(last.mean())), rel=1e-5)
    assert len(summary["nll_by_position"]) == math.ceil((n - 1) / 25)


def test_a_shared_prefix_gives_each_models_own_perplexity():
    import copy

    from dca import DCAConfig, apply_dca

    plain = tiny_llama(max_position_embeddings=32)
    config = DCAConfig(pretraining_length=32, chunk_size=24, local_window=4)  # chunk_len 20
    dca = apply_dca(copy.deepcopy(plain), config)
    ids = CharTokenizer()(ev.read_book("alice29.txt")[5000:5101])["input_ids"]
    assert ev.shared_prefix([None, config], len(ids)) == config.chunk_len == 20
    with torch.no_grad():
        alone = [ev.sequence_nll(m, ids, loss_slice=7) for m in (plain, dca)]
        shared = ev.shared_prefix_nll([plain, dca], ids, 20, loss_slice=7)
        # Past chunk_len DCA caches keys at j mod chunk_len: a longer prefix would be wrong.
        too_long = ev.shared_prefix_nll([plain, dca], ids, 30, loss_slice=7)
        with pytest.raises(ValueError, match="must be the plain model"):
            ev.shared_prefix_nll([dca, plain], ids, 20)
    for nll, expected in zip(shared.nll, alone):
        assert nll.shape == (len(ids) - 1,)
        torch.testing.assert_close(nll, expected, rtol=1e-4, atol=1e-4)
    assert (alone[1] - alone[0]).abs().max() > 1e-2  # the two models differ past chunk_size
    assert (too_long.nll[1] - alone[1]).abs().max() > 1e-2
    assert len(shared.seconds) == 2 and min(shared.seconds) > 0


def test_what_may_be_shared_follows_the_spec():
    from dca import DCAConfig

    wide, narrow = DCAConfig(pretraining_length=8192), DCAConfig(pretraining_length=4096)  # L 5120, 2560
    hot = DCAConfig(pretraining_length=8192, temperature_alpha=0.1)
    assert ev.shared_prefix([None, wide], 12000) == 5120
    assert ev.shared_prefix([None, wide, narrow], 12000) == 2560
    assert ev.shared_prefix([wide], 12000) == 0  # nothing to share with
    assert ev.shared_prefix([wide, narrow], 12000) == 0  # the plain model runs the prefix: none here
    assert ev.shared_prefix([None, None], 12000) == 0
    assert ev.shared_prefix([None, hot], 12000) == 0  # the temperature scales every logit past P
    assert ev.shared_prefix([None, hot], 8000) == 5120  # ... and none up to P
    assert ev.shared_prefix([None, wide], 5121) == 0  # no token would be left to a variant


def test_perplexity_windows_are_prefixes_across_lengths():
    book_ids = {"a": list(range(1000)), "b": list(range(5000, 5300))}
    short = ev.perplexity_windows(book_ids, ("a", "b"), 100, 3)
    long = ev.perplexity_windows(book_ids, ("a", "b"), 400, 3)
    assert [(b, s) for b, s, _ in short] == [("a", 0), ("b", 0), ("a", 100)]
    assert [(b, s) for b, s, _ in long] == [("a", 0), ("a", 400)]  # "b" is too short for 400
    assert long[0][2][:100] == short[0][2]


def test_equivalence_key_follows_the_spec():
    from dca import DCAConfig

    cfg = DCAConfig(pretraining_length=8192)  # S = 6144
    assert ev.equivalence_key(None, 16384) == ("plain",)
    assert ev.equivalence_key(cfg, 6145) == ("plain",)
    assert ev.equivalence_key(cfg, 6140, extra_tokens=8) != ("plain",)
    hot = DCAConfig(pretraining_length=8192, temperature_alpha=0.1)
    assert ev.equivalence_key(cfg, 8192) == ev.equivalence_key(hot, 8192)  # temperature is 1 up to P
    assert ev.equivalence_key(cfg, 8193) != ev.equivalence_key(hot, 8193)


# ---------------------------------------------------------------------------- full runs


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    config = ev.EvalConfig(
        variants=(
            ev.Variant(name="plain"),
            ev.Variant(name="dca", dca={}),
            ev.Variant(name="dca_alpha0.1", dca={"temperature_alpha": 0.1}),
            ev.Variant(name="dca_p128", dca={"pretraining_length": 128}, native_only=True),
        ),
        lengths=(300, 600),  # P = 512, S = 384: 300 is inside the exact range, 600 is past P
        depths=(0.0, 1.0), seeds=(0,), fillers=("repeat", "book"), windows=1, answer_tokens=3,
        books=("alice29.txt",), loss_slice=64, position_bucket=100, threads=None,
    )
    logs = []
    results = ev.run_evaluation(config, out, model=tiny_llama(512), tokenizer=CharTokenizer(), log=logs.append)
    return out, config, results, logs


def test_run_writes_results_and_plots(tiny_run):
    out, config, results, _ = tiny_run
    for name in ("results.json", "results.csv", "summary.md", "perplexity.png", "passkey.png", "loss_by_position.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "results.json").read_text())
    meta = data["meta"]
    for key in ("model", "commit", "date", "finished", "variants", "config", "torch"):
        assert meta[key], key
    assert meta["config"]["lengths"] == [300, 600]
    assert meta["config"]["depths"] == [0.0, 1.0] and meta["config"]["seeds"] == [0]
    assert meta["variants"]["dca"]["dca"]["chunk_size"] == 384
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(data["records"]) == len(results["records"])
    # perplexity: 1 window x (4 variants at 300 + 3 at 600); passkey: 2 fillers x 2 depths x same.
    assert len(rows) == 7 + 4 * 7
    assert {r["task"] for r in rows} == {"perplexity", "passkey"}
    assert "| plain |" in (out / "summary.md").read_text()


def test_run_reuses_results_dca_provably_shares(tiny_run):
    _, _, results, _ = tiny_run
    recs = results["records"]

    def find(task, variant, length):
        return [r for r in recs if r["task"] == task and r["variant"] == variant and r["length"] == length]

    for task in ("perplexity", "passkey"):
        # At 300 tokens (+3 decoded) <= S + 1, DCA with any alpha is the plain model.
        assert all(r["same_as"] == "plain" for r in find(task, "dca", 300) + find(task, "dca_alpha0.1", 300))
        # The P=128 ablation remaps positions at 300: computed, not copied. Never run past P=512.
        assert all(r["same_as"] is None for r in find(task, "dca_p128", 300))
        assert find(task, "dca_p128", 600) == []
        # Past P the temperature differs: both DCA variants computed.
        assert all(r["same_as"] is None for r in find(task, "dca", 600) + find(task, "dca_alpha0.1", 600))
    # What was computed differs from what it would have been copied from, by far more than float32
    # rounding (~1e-6 on a mean NLL): remapped positions past S, then the temperature past P.
    nll = {r["variant"]: r["nll"] for r in recs if r["task"] == "perplexity" and r["length"] == 600}
    assert abs(nll["dca"] - nll["plain"]) > 1e-3, nll
    assert abs(nll["dca"] - nll["dca_alpha0.1"]) > 1e-3, nll
    nll_300 = {r["variant"]: r["nll"] for r in recs if r["task"] == "perplexity" and r["length"] == 300}
    assert abs(nll_300["dca_p128"] - nll_300["plain"]) > 1e-3, nll_300


def test_run_computes_a_shared_prefix_once(tiny_run):
    _, _, results, logs = tiny_run
    at_300 = [r for r in results["records"] if r["task"] == "perplexity" and r["length"] == 300 and not r["same_as"]]
    # plain and the P=128 ablation (chunk_len 96 - 16 = 80): the first 80 tokens run once.
    assert sorted(r["variant"] for r in at_300) == ["dca_p128", "plain"]
    assert {r["shared_prefix"] for r in at_300} == {80}
    assert sum("dca_p128 continue(s) the plain model's KV cache of the first 80 tokens" in m for m in logs) == 1
    # At 600 the temperature variant scales every logit past P: nothing shared there.
    at_600 = [r for r in results["records"] if r["task"] == "perplexity" and r["length"] == 600]
    assert at_600 and all("shared_prefix" not in r for r in at_600)


def test_summary_averages_windows_in_log_space_and_keeps_fillers_apart():
    def ppl(variant, length, nll, nll_lq):
        return dict(task="perplexity", variant=variant, length=length, nll=nll, nll_last_quarter=nll_lq)

    def pk(variant, length, depth, filler, correct):
        return dict(task="passkey", variant=variant, length=length, depth=depth, seed=0, filler=filler,
                    correct=correct)

    records = [
        ppl("plain", 100, 1.0, 2.0), ppl("plain", 100, 3.0, 4.0), ppl("dca", 200, 0.5, 0.5),
        pk("plain", 100, 0.5, "repeat", True), pk("plain", 100, 0.5, "repeat", False),
        pk("plain", 100, 0.5, "book", False), pk("dca", 200, 0.1, "book", True),
    ]
    s = ev.summarize({"records": records})
    whole, last, n = s["perplexity"]["plain"][100]
    assert n == 2 and math.isclose(whole, math.exp(2.0)) and math.isclose(last, math.exp(3.0))
    assert list(s["passkey"]) == ["repeat", "book"]  # the repeated filler first
    assert s["passkey"]["repeat"] == {"plain": {100: {0.5: (1, 2)}}}
    assert s["passkey"]["book"] == {"plain": {100: {0.5: (0, 1)}}, "dca": {200: {0.1: (1, 1)}}}
    text = ev.summary_markdown({"records": records})
    assert "Passkey accuracy, repeat filler" in text and "Passkey accuracy, book filler" in text
    assert "| plain | 1/2 |" in text and "| dca |  | 1/1 |" in text
    assert f"| plain | {math.exp(2.0):.2f} / {math.exp(3.0):.2f} (2) |  |" in text


def test_resume_keeps_records_and_computes_nothing_new(tiny_run, tmp_path):
    out, config, results, _ = tiny_run
    (tmp_path / "results.json").write_text((out / "results.json").read_text())
    logs = []
    again = ev.run_evaluation(config, tmp_path, model=tiny_llama(512), tokenizer=CharTokenizer(), resume=True,
                              log=logs.append)
    assert len(again["records"]) == len(results["records"])
    assert not any(m.startswith(("perplexity n=", "passkey n=")) for m in logs)
    assert again["meta"]["previous_runs"][0]["commit"] == results["meta"]["commit"]


def test_resume_refuses_to_mix_models_or_redefined_variants_and_keeps_every_variant():
    plain = {"dca": None, "max_length": None, "native_only": False}
    dca = {"dca": {"temperature_alpha": 0.0}, "max_length": None, "native_only": False}
    old = {"model": "m", "commit": "abc", "variants": {"plain": plain, "dca": dca}, "config": {"lengths": [1]}}
    meta = ev.resumed_meta(old, {"model": "m", "variants": {"dca": dict(dca)}}, "out")
    assert set(meta["variants"]) == {"plain", "dca"}  # a stage running a subset keeps the rest described
    assert meta["previous_runs"][-1]["commit"] == "abc"
    with pytest.raises(ValueError, match="variant 'dca' was run with"):
        ev.resumed_meta(old, {"model": "m", "variants": {"dca": {**dca, "dca": {"temperature_alpha": 0.1}}}}, "out")
    with pytest.raises(ValueError, match="results of model 'm'"):
        ev.resumed_meta(old, {"model": "other", "variants": {}}, "out")


def test_cli_plot_only_redraws_from_results(tiny_run, tmp_path, capsys):
    from jobs import evaluate

    out, _, _, _ = tiny_run
    (tmp_path / "results.json").write_text((out / "results.json").read_text())
    assert evaluate.main(["--plot-only", str(tmp_path / "results.json")]) == 0
    assert (tmp_path / "passkey.png").is_file() and (tmp_path / "perplexity.png").is_file()
    assert "Passkey accuracy" in capsys.readouterr().out


def test_cli_builds_configs_from_flags():
    from jobs import evaluate

    args = evaluate.build_parser().parse_args(
        ["--mode", "full", "--lengths", "4096,8192", "--alphas", "0,0.05", "--depths", "0.25,0.75", "--threads", "1"]
    )
    config = evaluate.config_from_args(args)
    assert [v.name for v in config.variants] == ["plain", "dca", "dca_alpha0.05", "dca_p2048"]
    assert config.variants[2].dca == {"temperature_alpha": 0.05}
    assert config.variants[3].native_only
    assert config.lengths == (4096, 8192) and config.depths == (0.25, 0.75) and config.threads == 1
    quick = evaluate.config_from_args(evaluate.build_parser().parse_args([]))
    assert quick.model.dca is None and len(quick.lengths) == 2


def test_config_validation_and_file_round_trip(tmp_path):
    with pytest.raises(ValueError, match="depths"):
        ev.EvalConfig(depths=(1.5,))
    with pytest.raises(ValueError, match="unique"):
        ev.EvalConfig(variants=(ev.Variant(name="a"), ev.Variant(name="a")))
    with pytest.raises(ValueError, match="unknown EvalConfig"):
        ev.EvalConfig.from_dict({"lenghts": [1024]})
    config = ev.EvalConfig.full()
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(config.to_dict()))
    assert ev.EvalConfig.from_file(path) == config


def test_driver_side_imports_stay_light():
    code = (
        "import sys, jobs.evaluate, evaluation; "
        "heavy = [m for m in ('torch', 'transformers', 'matplotlib', 'dca') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_tensor_parallel_run_matches_one_process(tiny_model_dir, tmp_path):
    """Two AutoTP ranks (9 heads split 6 + 3) give the records of the unsharded model."""
    from pipeline.config.model import ModelSpec
    from pipeline.engine.models import load_model, load_tokenizer

    book = tmp_path / "book.txt"
    words = [f"w{3 + (i * 7919) % 120}" for i in range(400)]
    book.write_text(" ".join(words))
    config = ev.EvalConfig(
        model=ModelSpec(model=tiny_model_dir, dca=None),
        variants=(ev.Variant(name="plain"), ev.Variant(name="dca", dca={"chunk_size": 48, "local_window": 8})),
        lengths=(120,), tasks=("perplexity", "passkey"), depths=(0.5,), seeds=(0,), fillers=("book",),
        windows=1, answer_tokens=3, books=(str(book),), threads=1, device="cpu",
    )
    tp = ev.run_evaluation_tp(config, tmp_path / "tp", 2)
    model = load_model(config.model, "cpu")
    one = ev.run_evaluation(config, tmp_path / "one", model=model, tokenizer=load_tokenizer(config.model),
                            log=lambda m: None)
    assert (tmp_path / "tp" / "results.json").is_file() and (tmp_path / "tp" / "passkey.png").is_file()
    assert len(tp["records"]) == len(one["records"]) == 4
    for a, b in zip(tp["records"], one["records"]):
        assert (a["task"], a["variant"]) == (b["task"], b["variant"])
        if a["task"] == "perplexity":
            assert a["nll"] == pytest.approx(b["nll"], rel=1e-5)
        else:
            assert a["answer"] == b["answer"]
    ppl = {r["variant"]: r["ppl"] for r in one["records"] if r["task"] == "perplexity"}
    assert ppl["plain"] != ppl["dca"]  # 120 tokens > chunk_size + 1: DCA is active


def test_cli_config_file_overrides_only_the_fields_it_names(tmp_path):
    from jobs import evaluate

    path = tmp_path / "variants.json"
    path.write_text(json.dumps({"variants": [{"name": "plain", "dca": None}, {"name": "dca", "dca": {}}]}))
    config = evaluate.config_from_args(evaluate.build_parser().parse_args(["--mode", "full", "--config", str(path)]))
    assert [v.name for v in config.variants] == ["plain", "dca"]
    assert config.lengths == ev.EvalConfig.full().lengths and config.fillers == ev.EvalConfig.full().fillers


def test_document_comparison_splits_at_the_trained_length():
    # 25 tokens (24 targets), buckets of 4 targets, trained length 16: rows 0-16 | 16-25: 16-20, 20-25.
    results = {"meta": {"model": "m", "max_position_embeddings": 16, "config": {"position_bucket": 4}},
               "records": [
                   {"task": "perplexity", "variant": "plain", "length": 25, "book": "/x/doc.txt",
                    "nll_by_position": [1.0, 1.0, 1.0, 1.0, 2.0, 3.0]},
                   {"task": "perplexity", "variant": "dca", "length": 25, "book": "/x/doc.txt",
                    "nll_by_position": [1.0, 1.0, 1.0, 1.0, 1.0, 1.5]},
               ]}
    text = ev.document_comparison(results)
    lines = text.splitlines()
    assert "doc.txt (25 tokens), trained on 16 tokens" in lines[0]
    assert lines[2].split() == ["plain", "dca"]
    row = {line[:34].strip(): line[34:].split() for line in lines[3:]}
    assert row["tokens 0-16 (trained length)"] == [f"{math.e:.1f}", f"{math.e:.1f}"]
    past = math.exp((2.0 * 4 + 3.0 * 4) / 8)  # the last bucket holds 4 targets too (24 = 6 x 4)
    assert row["tokens 16-25 (past it)"] == [f"{past:.1f}", f"{math.exp((4 + 6) / 8):.1f}"]
    assert row["16-20"] == [f"{math.exp(2):.1f}", f"{math.e:.1f}"] and row["20-25"] == [f"{math.exp(3):.1f}", f"{math.exp(1.5):.1f}"]
    assert "-" not in text.replace("0-16", "").replace("16-", "").replace("20-", "")  # no empty cells
    with pytest.raises(ValueError, match="must divide"):
        ev.document_comparison(results, split=10)


def test_cli_document_compares_plain_and_dca_on_one_text(tmp_path, capsys):
    from jobs import evaluate
    from tests.pipeline.conftest import build_tiny_model

    model = build_tiny_model(str(tmp_path / "model"))  # P = 64, word tokenizer
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(f"w{3 + (i * 31) % 120}" for i in range(100)))
    assert evaluate.main(["--document", str(doc), "--model", model, "--out", str(tmp_path / "out"),
                          "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "doc.txt (100 tokens), trained on 64 tokens" in out
    assert "tokens 0-64 (trained length)" in out and "tokens 64-100 (past it)" in out and "96-100" in out
    records = json.loads((tmp_path / "out" / "results.json").read_text())["records"]
    assert {r["variant"] for r in records} == {"plain", "dca"} and {r["length"] for r in records} == {100}


def test_cli_errors_are_one_line(tmp_path, capsys):
    from jobs import evaluate

    assert evaluate.main(["--document", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.txt" in err and err.count("\n") == 1
