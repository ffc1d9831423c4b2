"""counter_uniform: the Triton kernel (interpreter on CPU) is bit-identical to the reference hash, and the
reference equals the sampler's noise; odd widths, one row, seeds above 2^32, wide rows across blocks."""
import pytest
import torch

from omni_rt import sampling as sampler
from omni_rt.kernels import force_triton
from omni_rt.kernels.counter_uniform import counter_uniform, counter_uniform_ref


@pytest.mark.parametrize("batch,n", [(1, 1), (3, 37), (2, 2049), (4, 0)])
def test_triton_bit_identical(batch, n):
    seeds = torch.tensor([0, 2 ** 40 + 7, 123456789, 2 ** 63 - 1][:batch], dtype=torch.int64)
    steps = torch.tensor([0, 5, 2 ** 31 + 3, 17][:batch], dtype=torch.int64)
    want = counter_uniform_ref(seeds, steps, n)
    with force_triton():
        got = counter_uniform(seeds, steps, n)
    assert got.dtype == torch.float64 and got.shape == (batch, n)
    assert torch.equal(got, want)
    if n:
        assert (got > 0).all() and (got < 1).all()


def test_reference_is_the_samplers_noise():
    seeds = torch.tensor([3, 2 ** 50], dtype=torch.int64)
    steps = torch.tensor([1, 9], dtype=torch.int64)
    assert torch.equal(counter_uniform_ref(seeds, steps, 300), sampler.counter_uniform(seeds, steps, 300))


def test_errors():
    with pytest.raises(ValueError, match="seeds"):
        counter_uniform(torch.zeros(2, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), 4)


@pytest.mark.gpu
def test_gpu_bit_identical():
    seeds = torch.randint(0, 2 ** 62, (8,), device="cuda")
    steps = torch.randint(0, 2 ** 31, (8,), device="cuda")
    assert torch.equal(counter_uniform(seeds, steps, 151936), counter_uniform_ref(seeds, steps, 151936))
