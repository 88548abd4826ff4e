"""GPU paths: the torch backend on CUDA and flash-attn against a float32 reference run."""

import importlib.util

import pytest
import torch
from torch.testing import assert_close

from dca import DCAConfig, apply_dca
from tests.dca.conftest import TINY_DCA, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_torch_backend_on_cuda_matches_cpu():
    model = tiny_model(dtype=torch.float32)
    x = torch.randint(1, 101, (2, 90))
    cpu = apply_dca(model, TINY_DCA)(x).logits
    gpu = model.cuda()(x.cuda()).logits.cpu()
    assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn not installed")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flash_backend_matches_torch_within_low_precision(dtype):
    x = torch.randint(1, 101, (1, 90), device="cuda")
    ref = apply_dca(tiny_model(dtype=torch.float32).cuda(), DCAConfig(32, 24, 4, backend="torch"))(x).logits
    torch_lp = apply_dca(tiny_model(dtype=dtype).cuda(), DCAConfig(32, 24, 4, backend="torch"))(x).logits.float()
    flash = apply_dca(tiny_model(dtype=dtype).cuda(), DCAConfig(32, 24, 4, backend="flash"))(x).logits.float()
    # flash-attention's own test rule: at most twice the error of a low-precision PyTorch run
    assert (flash - ref).abs().max() <= 2 * (torch_lp - ref).abs().max() + 1e-3
