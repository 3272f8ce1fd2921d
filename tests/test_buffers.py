"""kernels/_buffers.py: new buffers that AOTAutograd's cached backward graph can rebuild.

A factory call whose size list starts with a plain int followed by a symbolic size cannot be
retraced by FX (torch 2.11 retraces a cached backward graph when it reads the cache entry; the
entry is then skipped and the graph compiled again). The launchers allocate through _buffers."""
from __future__ import annotations

import ast
import pathlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from fastlora.kernels import _buffers

KERNELS = pathlib.Path(_buffers.__file__).parent


def _fake(shape, dynamic):
    """A fake tensor whose dims in ``dynamic`` are symbolic (the others plain ints)."""
    mode = FakeTensorMode(shape_env=ShapeEnv())
    context = StatelessSymbolicContext(
        dynamic_sizes=[DimDynamic.DYNAMIC if d in dynamic else DimDynamic.STATIC
                       for d in range(len(shape))])
    return mode, mode.from_tensor(torch.empty(shape), symbolic_context=context)


def _rebuilt(fn, shape=(4, 6, 3, 8), dynamic=(1,)):
    """The graph ``fn(x)`` traces to (inductor's decompositions, as AOTAutograd traces), then
    rebuilt from its source as AOTAutograd's cache does (``GraphModule.__reduce__``)."""
    from torch._inductor.decomposition import select_decomp_table

    mode, x = _fake(shape, dynamic)
    with mode:
        gm = make_fx(fn, decomposition_table=select_decomp_table())(x)
    gm.meta = {}
    for node in gm.graph.nodes:
        node.meta = {}
    rebuild, args = gm.__reduce__()
    return rebuild(*args)


def test_the_retrace_fails_on_plain_factory_calls():
    """The control: PyTorch's own calls with a plain int before a symbolic size cannot be
    rebuilt (if this starts passing, a PyTorch release fixed it and _buffers may go)."""
    for fn in (lambda x: torch.empty((12, x.shape[1], 32)),
               lambda x: torch.zeros((4, x.shape[1])),
               lambda x: torch.empty_like(x)):
        with pytest.raises(RuntimeError, match="Expected a value of type"):
            _rebuilt(fn)


@pytest.mark.parametrize("fn", [
    lambda x: _buffers.empty((12, x.shape[1], 32), torch.float32, x.device),
    lambda x: _buffers.zeros((4, x.shape[1]), torch.bfloat16, x.device),
    lambda x: _buffers.empty_like(x),
    lambda x: _buffers.empty_like(x.transpose(1, 2), torch.float16),
    lambda x: _buffers.empty((x.shape[1], 5), torch.float32, x.device),
    lambda x: _buffers.zeros((3, 5), torch.float32, x.device),
], ids=["empty", "zeros", "empty_like", "empty_like_transposed", "symbolic_head", "static"])
def test_buffers_rebuild(fn):
    rebuilt = _rebuilt(fn)
    assert isinstance(rebuilt, torch.fx.GraphModule)


@pytest.mark.parametrize("shape,dims", [((3, 37, 72), None), ((2, 5, 3, 4), (0, 2, 1, 3)),
                                        ((4, 1, 6), (2, 0, 1)), ((), None), ((0, 3), None),
                                        ((2, 7, 3, 16), "slice")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_buffers_match_the_factory_calls(shape, dims, dtype):
    """Shape, dtype, device and strides as torch.empty / zeros / empty_like give them (a
    transposed tensor, and one with gaps: q of a packed qkv, heads first)."""
    base = torch.randn(shape)
    if dims == "slice":
        t = base[..., :8].transpose(1, 2)  # not dense: empty_like infers a dense order
        assert not t.is_contiguous()
    else:
        t = base.permute(dims) if dims else base
    flat = _buffers._flat_empty(tuple(t.shape), dtype, t.device)  # the forms traced graphs get
    permuted = _buffers._permuted_empty_like(t, dtype)
    for ours, theirs in ((_buffers.empty(t.shape, dtype, t.device), torch.empty(t.shape, dtype=dtype)),
                         (flat, torch.empty(t.shape, dtype=dtype)),
                         (_buffers.zeros(t.shape, dtype, t.device), torch.zeros(t.shape, dtype=dtype)),
                         (_buffers.empty_like(t, dtype), torch.empty_like(t, dtype=dtype)),
                         (permuted, torch.empty_like(t, dtype=dtype)),
                         (_buffers.empty_like(t), torch.empty_like(t))):
        assert (ours.shape, ours.dtype, ours.device) == (theirs.shape, theirs.dtype, theirs.device)
        assert all(a == b for a, b, n in zip(ours.stride(), theirs.stride(), ours.shape) if n > 1)
    assert not _buffers.zeros(t.shape, dtype, t.device).any()


@pytest.mark.parametrize("dynamic", [(0,), (1,), (0, 1), (0, 2)])
def test_symbolic_buffers_have_pytorchs_storage_expression(dynamic):
    """With symbolic sizes a buffer's storage size is the expression PyTorch gives a strided
    tensor (empty_strided, a graph's inputs: ``28*s1*(s0 - 1) + 28*s1``), not the product of the
    sizes that ``torch.empty(shape)`` or a rows-first buffer viewed gives (``28*s0*s1``).
    torch.compile compares the two as metadata: a layer body shared by nested_compile_region
    (reuse_layers) had its backward traced once more for the last layer, whose gradient came
    from a buffer of ours, than for the others (_buffers._storage_length;
    tests/test_shared_body_backward.py)."""
    mode, x = _fake((3, 5, 7), dynamic)
    with mode:
        pairs = [(_buffers.empty(x.shape, torch.float32, x.device), x),
                 (_buffers.empty_like(x), x),
                 (_buffers.zeros(x.shape, torch.bfloat16, x.device),
                  torch.empty_strided(x.shape, x.stride(), dtype=torch.bfloat16))]
        for ours, theirs in pairs:
            assert str(ours.untyped_storage().nbytes()) == str(theirs.untyped_storage().nbytes())
            assert ours.shape == theirs.shape and ours.stride() == theirs.stride()
        if len(dynamic) > 1:  # where the two forms differ: a product of two symbols
            product = torch.empty(x.shape).untyped_storage().nbytes()
            assert str(product) != str(pairs[0][0].untyped_storage().nbytes())


# Factory calls the launchers must not make with a shape (an int or () is fine: no list to
# rebuild). register_fake functions and the CPU references are not traced into a graph.
FACTORIES = {"empty", "zeros", "full", "empty_like", "zeros_like", "full_like", "new_empty",
             "new_zeros", "new_full", "ones", "ones_like", "new_ones"}
NOT_TRACED = ("_reference.py", "_buffers.py")  # files


def _not_traced(tree: ast.Module) -> set[str]:
    """Functions that never run in a traced body: fakes (decorated with, or passed to,
    ``register_fake``) and the PyTorch references (CPU tensors only)."""
    names = {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
             and ("reference" in f.name
                  or any("register_fake" in ast.unparse(d) for d in f.decorator_list))}
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and ast.unparse(call.func).endswith(".register_fake"):
            names |= {a.id for a in call.args if isinstance(a, ast.Name)}
    return names


def _static(call: ast.Call, name: str) -> bool:
    """A call that builds no size list: ``x.new_empty(0)``, ``torch.zeros(1)``, ``torch.ones(())``."""
    if name.endswith("_like") or not call.args:
        return False
    first = call.args[0]
    return isinstance(first, ast.Constant) or (isinstance(first, ast.Tuple) and not first.elts)


def _direct_factory_calls(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    skip = _not_traced(tree)
    for func_def in ast.walk(tree):
        if not isinstance(func_def, ast.FunctionDef) or func_def.name in skip:
            continue
        called = {id(n.func) for n in ast.walk(func_def) if isinstance(n, ast.Call)}
        for node in ast.walk(func_def):
            if isinstance(node, ast.Attribute) and id(node) not in called \
                    and node.attr in FACTORIES and ast.unparse(node.value) == "torch":
                # a factory taken as a value (alloc = torch.empty if M else torch.zeros) and
                # called later: its sizes are out of sight here, so it counts as a direct call
                yield f"{path.name}:{node.lineno} ({func_def.name}): {ast.unparse(node)}"
                continue
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            name, owner = node.func.attr, ast.unparse(node.func.value)
            if name not in FACTORIES or owner in ("tl", "_buffers") \
                    or (owner != "torch" and not name.startswith("new_")):
                continue
            if not _static(node, name):
                yield f"{path.name}:{node.lineno} ({func_def.name}): {ast.unparse(node)[:70]}"


def test_launchers_allocate_through_buffers():
    found = [hit for path in sorted(KERNELS.glob("*.py")) if not path.name.endswith(NOT_TRACED)
             for hit in dict.fromkeys(_direct_factory_calls(path))]
    assert not found, "allocate through kernels/_buffers.py:\n" + "\n".join(found)
