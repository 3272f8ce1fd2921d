"""embedding_from_host (Triton under the interpreter, and the PyTorch reference) vs indexing:
a gather copies values, so the rows must be equal, bit for bit; ids outside the table give NaN
rows."""
import pytest
import torch

from fastlora.kernels import embedding_from_host as K

SHAPES = [(3, 37), (5,), (2, 3, 4), (1, 1)]
IMPLS = {"triton": K.embedding_from_host_triton, "reference": K.embedding_from_host_reference}


def _gather(impl, ids, table):
    if impl == "triton":  # a poisoned output: every element must be written
        out = torch.full((ids.numel(), table.shape[1]), 12345.0, dtype=table.dtype)
        return K.embedding_from_host_triton(ids, table, out=out)
    return IMPLS[impl](ids, table)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [72, 5, 1030])  # 1030: a row wider than one column block
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_rows_equal_indexing(shape, dtype, dim, id_dtype, impl):
    table = torch.randn(101, dim).to(dtype)
    ids = torch.randint(0, 101, shape, dtype=id_dtype)
    rows = _gather(impl, ids, table)
    assert rows.shape == (*shape, dim) and rows.dtype == dtype
    assert torch.equal(rows, table[ids.long()])


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_a_column_slice_of_a_wider_table(impl):
    wide = torch.randn(50, 96)
    table = wide[:, 8:80]  # rows 96 apart
    ids = torch.randint(0, 50, (3, 37))
    assert torch.equal(_gather(impl, ids, table), table[ids])


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_ids_outside_the_table_give_nan_rows(impl):
    table = torch.randn(20, 24)
    ids = torch.tensor([[0, -1, 19], [20, 5, 1000]])
    rows = _gather(impl, ids, table)
    bad = (ids < 0) | (ids >= 20)
    assert torch.isnan(rows[bad]).all()
    assert torch.equal(rows[~bad], table[ids[~bad]])


def test_the_op_checks_its_inputs():
    op = torch.ops.fastlora.embedding_from_host
    table = torch.randn(10, 8)
    with pytest.raises(TypeError, match="int32 or int64"):
        op(torch.zeros(3), table)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        op(torch.zeros(3, dtype=torch.long), torch.zeros(10, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="must be 2-D"):
        op(torch.zeros(3, dtype=torch.long), torch.randn(10))
    with pytest.raises(RuntimeError, match="requires grad"):
        op(torch.zeros(3, dtype=torch.long), table.requires_grad_())
    # a table on another device must be in pinned host memory (meta stands for the GPU here)
    with pytest.raises(RuntimeError, match="pinned host memory"):
        K._validate(torch.zeros(3, dtype=torch.long, device="meta"), torch.randn(10, 8))
    K._validate(torch.zeros(3, dtype=torch.long, device="meta"), torch.randn(10, 8), fake=True)


def test_opcheck():
    ids = torch.randint(0, 10, (3, 7))
    torch.library.opcheck(torch.ops.fastlora.embedding_from_host, (ids, torch.randn(10, 8)))
