"""CUDA kernels agree bit for bit with the CPU kernels. Skipped without a GPU."""

import pytest
import torch

import linquant as lq
from conftest import cuda_only

pytestmark = cuda_only


@pytest.mark.parametrize("shape,axis,group_size", [((64, 256), None, None), ((64, 256), 0, None),
                                                    ((3, 50, 70), None, 32), ((9, 33), 1, None),
                                                    ((0, 8), None, 4)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_matches_cpu(shape, axis, group_size, symmetric, dtype, gen):
    x = torch.randn(shape, generator=gen)
    scale, zp = lq.choose_qparams(x, bits=4, symmetric=symmetric, axis=axis, group_size=group_size)
    q = lq.quantize(x, scale, zp, bits=4, axis=axis, group_size=group_size)
    cpu = lq.dequantize(q, scale, zp, axis=axis, group_size=group_size, dtype=dtype)
    gpu = lq.dequantize(q.cuda(), scale.cuda(), None if zp is None else zp.cuda(), axis=axis,
                        group_size=group_size, dtype=dtype)
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)


def test_dequantize_opcheck_on_cuda():
    x = torch.randn(16, 64)
    scale, zp = lq.choose_qparams(x, bits=8, symmetric=False, group_size=16)
    q = lq.quantize(x, scale, zp, bits=8, group_size=16)
    torch.library.opcheck(torch.ops.linquant.dequantize.default,
                          (q.cuda(), scale.cuda(), zp.cuda(), None, 16, torch.float16))


def test_mixed_devices_raise():
    q = torch.zeros(4, 8, dtype=torch.int8, device="cuda")
    with pytest.raises(ValueError, match="scale is on cpu but the input is on cuda"):
        lq.dequantize(q, torch.ones(()))
