"""lz.embedding against an independent gather in float64, padding, gradients and errors."""

from __future__ import annotations

import pytest
import torch

import layerzero as lz


@pytest.mark.parametrize("kernel", ["torch_ops.embedding", "reference.embedding"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("ids_shape", [(7,), (3, 5), (2, 3, 4)])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_matches_gather(kernel, dtype, ids_shape, ids_dtype):
    lz.lock("embedding.lookup", kernel)
    table = torch.randn(101, 24, dtype=torch.float64).to(dtype)
    ids = torch.randint(0, 101, ids_shape, dtype=ids_dtype)
    out = lz.embedding(ids, table)
    assert lz.which("embedding", ids, table) == kernel
    want = torch.stack([table[int(i)].double() for i in ids.reshape(-1)]).reshape(*ids_shape, 24)
    assert out.dtype == dtype and out.shape == (*ids_shape, 24)
    assert torch.equal(out.double(), want)  # a lookup is exact


@pytest.mark.parametrize("kernel", ["torch_ops.embedding", "reference.embedding"])
@pytest.mark.parametrize("padding_idx", [0, 5, -1])
def test_padding_positions_are_zero(kernel, padding_idx):
    lz.lock("embedding.lookup", kernel)
    table = torch.randn(10, 8) + 3.0  # no zero rows
    ids = torch.tensor([[0, 5, 9], [5, 1, 0]])
    out = lz.embedding(ids, table, padding_idx=padding_idx)
    pad = padding_idx % 10
    assert (out[ids == pad] == 0).all()
    assert torch.equal(out[ids != pad], table[ids[ids != pad]])


def test_gradient_flows_except_padding():
    table = torch.randn(10, 4, requires_grad=True)
    ids = torch.tensor([1, 2, 2, 3])
    lz.embedding(ids, table, padding_idx=3).sum().backward()
    assert table.grad[2].eq(2).all() and table.grad[1].eq(1).all() and table.grad[3].eq(0).all()


@pytest.mark.parametrize("args, argument", [
    ((torch.tensor([1.0]), torch.randn(4, 2)), "ids"),
    ((torch.tensor([1]), torch.randn(4)), "table"),
    ((torch.tensor([1]), torch.ones(4, 2, dtype=torch.int64)), "table"),
    ((torch.tensor([4]), torch.randn(4, 2)), "ids"),
    ((torch.tensor([-1]), torch.randn(4, 2)), "ids"),
    ((torch.tensor([1]), torch.randn(4, 2), 4), "padding_idx"),
    (([1, 2], torch.randn(4, 2)), "ids"),
])
def test_bad_input_names_the_argument(args, argument):
    with pytest.raises(lz.InvalidInputError) as err:
        lz.embedding(*args)
    assert err.value.argument == argument
