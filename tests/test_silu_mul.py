"""kernels/silu_mul.py under the interpreter against its reference (F.silu(gate) * up): odd widths, one row,
widths over one column block, strided rows (a slice of a wider buffer), 3-D inputs, empty; launcher checks."""
import pytest
import torch
import torch.nn.functional as F

from omni_rt.kernels import force_triton
from omni_rt.kernels.silu_mul import silu_mul, silu_mul_ref

from _tolerances import assert_close


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2), (1, 96), (7, 2 * 37), (3, 2 * 1100), (2, 5, 48)])
def test_triton_matches_ref(dtype, shape):
    x = (torch.randn(shape) * 3).to(dtype)
    want = silu_mul_ref(x)
    with force_triton():
        got = silu_mul(x)
    assert got.dtype == dtype and got.shape == (*shape[:-1], shape[-1] // 2) and got.is_contiguous()
    assert_close(got, want, name=f"silu_mul {shape} {dtype}")


def test_strided_rows():
    base = torch.randn(6, 80)
    x = base[1:5, 4:68]            # rows of stride 80, 64 columns: gate 32 then up 32
    assert not x.is_contiguous()
    with force_triton():
        got = silu_mul(x)
    assert_close(got, F.silu(x[:, :32]) * x[:, 32:], name="strided")


def test_ref_is_the_unfused_mlp_activation():
    x = torch.randn(4, 20).to(torch.bfloat16)
    assert torch.equal(silu_mul_ref(x), F.silu(x[:, :10]) * x[:, 10:])


def test_empty_and_errors():
    with force_triton():
        assert silu_mul(torch.empty(0, 8)).shape == (0, 4)
    with pytest.raises(ValueError, match="2I"):
        silu_mul(torch.ones(2, 7))
    with pytest.raises(ValueError, match="float"):
        silu_mul(torch.ones(2, 8, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("rows,inter", [(1, 3072), (16, 3072), (1, 768), (75, 768)])
def test_gpu_matches_ref(rows, inter):
    x = torch.randn(rows, 2 * inter, device="cuda").to(torch.bfloat16)
    assert_close(silu_mul(x), silu_mul_ref(x), name="silu_mul gpu")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = silu_mul(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert_close(static, silu_mul_ref(x), name="silu_mul graph replay")
