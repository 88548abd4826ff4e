import dataclasses
import importlib.util
import os

import pytest
import torch

# Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors. Triton reads this
# when dca.triton_kernels is imported (never before a test asks for the "triton" backend).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dca import DCAConfig, kernels  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None


def tiny_config(model_type="llama", heads=4, kv_heads=2, head_dim=16, layers=2, **extra):
    from transformers import AutoConfig

    values = dict(
        vocab_size=101, hidden_size=heads * head_dim, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=32, rope_theta=10000.0, pad_token_id=0, tie_word_embeddings=False,
    )
    if model_type in ("mistral",):
        values["sliding_window"] = None
    values.update(extra)
    return AutoConfig.for_model(model_type, **values)


def tiny_model(model_type="llama", dtype=torch.float64, attn_implementation="sdpa", seed=0, **config_kwargs):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, **config_kwargs)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.to(dtype).eval()


def left_pad(rows, pad_id=0):
    """(1, n_i) id tensors -> (B, max n) ids and 0/1 mask, each row right-aligned (left padding)."""
    width = max(row.shape[1] for row in rows)
    batch = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        batch[r, width - row.shape[1] :] = row[0]
        mask[r, width - row.shape[1] :] = 1
    return batch, mask


# P=32, S=24, W=4 -> L=20: a 87-token input spans 5 chunks, the last one partial.
TINY_DCA = DCAConfig(pretraining_length=32, chunk_size=24, local_window=4)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _fast_interpreter() -> None:
    """Two shortcuts in Triton's interpreter (test speed only, not results):

    - it checks every int32 operation for overflow (a third of its time); the kernels index in
      int64 where it matters;
    - every call of a nested @jit function (tl.max, tl.sum in the kernels' loops) re-patches
      triton.language's modules, and never undoes it: patching each function once is enough.
    """
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)
    patch, patched = interpreter._patch_lang, set()

    def patch_nested_once(fn):
        if fn not in patched:
            patched.add(fn)
            patch(fn)

    def call(self, *args, **kwargs):  # InterpretedFunction.__call__ with the patching above
        patch_nested_once(self.fn)
        try:
            return self.rewrite()(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    interpreter.InterpretedFunction.__call__ = call


if HAS_TRITON and kernels.triton_interpreted():
    try:
        _fast_interpreter()
    except (AttributeError, TypeError, ImportError):  # another Triton's internals: just slower
        pass


@pytest.fixture
def one_torch_thread():
    """The interpreter's tl.dot runs numpy's BLAS threads; next to torch's OpenMP threads on a small
    shared machine, both spin and every tiny torch op waits (twice the time). One torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["torch", "triton"])
def dca_backend(request, monkeypatch):
    """Runs a test twice: with the torch backend, and with "auto" resolving to the Triton kernels
    (through the interpreter on CPU; on a CUDA machine the CPU-model tests skip it, and
    tests/dca/test_triton_gpu.py runs the compiled kernels)."""
    if request.param == "triton":
        if not HAS_TRITON:
            pytest.skip("triton is not installed")
        if not kernels.triton_interpreted():
            pytest.skip("CPU models need Triton's interpreter (TRITON_INTERPRET=1)")
        resolve = kernels.resolve_backend
        monkeypatch.setattr(kernels, "resolve_backend",
                            lambda requested, device, dtype: resolve("triton" if requested == "auto" else requested,
                                                                     device, dtype))
        request.getfixturevalue("one_torch_thread")
    return request.param
