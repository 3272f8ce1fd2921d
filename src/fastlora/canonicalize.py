"""Step 2 of the pipeline: put a Dynamo FX graph into one canonical spelling.

Dynamo records what the model's Python did, so one computation arrives in many spellings:
``x.pow(2)`` (call_method) and ``torch.pow(x, 2)`` (call_function), ``a * b`` (operator.mul) and
``torch.mul(a, b)``, ``linear(x, w)`` and ``linear(x, w, None)``, ``x.float()`` and
``x.to(torch.float32)``. Patterns are traced from plain PyTorch functions and pass through the
same function, so the matcher compares canonical targets and positional arguments only.

Rules (each keeps the graph's meaning exactly):
- call_method ``m`` becomes call_function ``torch.m`` where that takes the same arguments
  (``_SAME_AS_FUNCTION``), else ``torch.Tensor.m``; ``operator.*`` arithmetic on tensors becomes
  ``torch.*`` (on sizes, SymInts under dynamic shapes, it stays Python's).
- every dtype cast (``to``, ``float``, ``half``, ``bfloat16``, ``double``, ``type``, ``type_as``)
  becomes ``torch.Tensor.to(x, dtype)``; a cast that changes nothing (same dtype and device,
  read from ``meta["example_value"]``) is removed, its users reading its input.
- ``x * x`` becomes ``torch.pow(x, 2)``.
- arguments become positional with defaults filled in, for the ops in ``_SIGNATURES``.
- in an index, a slice that starts at 0 or steps by 1 forwards spells the default:
  ``x[..., 0::2]`` is ``x[..., ::2]`` (GLM's rotate_half, Cohere's).
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

# The one callable each cast is rewritten to.
CAST = torch.Tensor.to

_OPERATOR_TO_TORCH = {
    operator.add: torch.add, operator.iadd: torch.add,
    operator.sub: torch.sub, operator.isub: torch.sub,
    operator.mul: torch.mul, operator.imul: torch.mul,
    operator.truediv: torch.div, operator.itruediv: torch.div,
    operator.neg: torch.neg,
    operator.pow: torch.pow,
    operator.matmul: torch.matmul,
}

_NAMED_CASTS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16,
                "double": torch.float64}

_REQUIRED = object()
_KW_ONLY = ("*", None)
# target -> parameters and defaults in order; those after "*" are keyword-only. Arguments are
# rewritten as positional (up to "*") and keyword (after it) with every default filled in.
_SIGNATURES: dict = {
    F.linear: [("input", _REQUIRED), ("weight", _REQUIRED), ("bias", None)],
    torch.mean: [("input", _REQUIRED), ("dim", None), ("keepdim", False), _KW_ONLY,
                 ("dtype", None)],
    torch.sum: [("input", _REQUIRED), ("dim", None), ("keepdim", False), _KW_ONLY,
                ("dtype", None)],
    torch.pow: [("input", _REQUIRED), ("exponent", _REQUIRED)],
    torch.add: [("input", _REQUIRED), ("other", _REQUIRED), _KW_ONLY, ("alpha", 1)],
    torch.sub: [("input", _REQUIRED), ("other", _REQUIRED), _KW_ONLY, ("alpha", 1)],
    torch.mul: [("input", _REQUIRED), ("other", _REQUIRED)],
    torch.div: [("input", _REQUIRED), ("other", _REQUIRED), _KW_ONLY, ("rounding_mode", None)],
    torch.rsqrt: [("input", _REQUIRED)],
    torch.sqrt: [("input", _REQUIRED)],
    torch.neg: [("input", _REQUIRED)],
    torch.tanh: [("input", _REQUIRED)],
    torch.cat: [("tensors", _REQUIRED), ("dim", 0)],
    F.silu: [("input", _REQUIRED), ("inplace", False)],
    F.gelu: [("input", _REQUIRED), _KW_ONLY, ("approximate", "none")],
    F.layer_norm: [("input", _REQUIRED), ("normalized_shape", _REQUIRED), ("weight", None),
                   ("bias", None), ("eps", 1e-5)],
    F.dropout: [("input", _REQUIRED), ("p", 0.5), ("training", True), ("inplace", False)],
    F.cross_entropy: [("input", _REQUIRED), ("target", _REQUIRED), ("weight", None),
                      ("size_average", None), ("ignore_index", -100), ("reduce", None),
                      ("reduction", "mean"), ("label_smoothing", 0.0)],
    F.scaled_dot_product_attention: [("query", _REQUIRED), ("key", _REQUIRED),
                                     ("value", _REQUIRED), ("attn_mask", None),
                                     ("dropout_p", 0.0), ("is_causal", False), _KW_ONLY,
                                     ("scale", None), ("enable_gqa", False)],
}


def example_value(node):
    """The fake tensor (or value) Dynamo recorded for ``node``; None when unknown."""
    if not isinstance(node, fx.Node):
        return node
    return node.meta.get("example_value", node.meta.get("val"))


def canonical_target(target):
    """The canonical callable for a call_function target."""
    if target in _OPERATOR_TO_TORCH:
        return _OPERATOR_TO_TORCH[target]
    if target is torch._C._nn.linear:
        return F.linear
    name = getattr(target, "__name__", None)
    owner = getattr(target, "__objclass__", None) or getattr(target, "__self__", None)
    if name and owner in (torch._C.TensorBase, torch.Tensor):
        return _method_target(name)
    return target


# Methods whose torch.* function takes the same arguments; others stay ``torch.Tensor.m``
# (``x.reshape(2, 3)`` and ``torch.reshape(x, (2, 3))`` differ, so only this list is mapped).
_SAME_AS_FUNCTION = {
    "add", "sub", "mul", "div", "neg", "pow", "mean", "sum", "rsqrt", "sqrt", "tanh", "exp",
    "sigmoid", "erf", "abs", "matmul", "transpose", "unsqueeze", "softmax", "clamp", "maximum",
    "minimum", "square",
}


# Comparison dunders (``a.__eq__(b)``: Dynamo records HF's ``a == b`` on some versions as this
# method call, on others as operator.eq) become the torch comparison functions.
_DUNDER_COMPARE = {"__eq__": torch.eq, "__ne__": torch.ne, "__lt__": torch.lt,
                   "__le__": torch.le, "__gt__": torch.gt, "__ge__": torch.ge}


def _method_target(name: str):
    if name in _DUNDER_COMPARE:
        return _DUNDER_COMPARE[name]
    if name in _SAME_AS_FUNCTION:
        return getattr(torch, name)
    return getattr(torch.Tensor, name)


def _cast_dtype(node: fx.Node):
    """If ``node`` is a pure dtype cast, return ``(input, dtype)``, else None.

    In a Dynamo graph the dtype is read from the recorded output. In a pattern graph (no
    recorded values) it is what the spelling said: a ``torch.dtype``, or a node whose dtype it
    copies (``x.to(y.dtype)``, ``x.type_as(y)``); the matcher resolves it after binding.
    A cast that also moves the tensor to another device is not a pure cast.
    """
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function" and node.target in (torch.Tensor.to, torch.Tensor.type,
                                                        torch.Tensor.type_as, torch.Tensor.float):
        name = node.target.__name__
    else:
        return None
    args, kwargs = list(node.args), dict(node.kwargs)
    if not args:
        return None
    src, spec = args[0], None
    if name in _NAMED_CASTS and len(args) == 1 and not kwargs:
        spec = _NAMED_CASTS[name]
    elif name == "type_as" and len(args) == 2 and not kwargs:
        spec = args[1]
    elif name in ("to", "type"):
        spec = kwargs.pop("dtype", None)
        kwargs.pop("device", None)
        kwargs.pop("non_blocking", None)
        if kwargs:  # copy=True, memory_format=...: not a plain cast
            return None
        for a in args[1:]:
            if isinstance(a, (torch.dtype, fx.Node)):
                spec = a
            elif not isinstance(a, (torch.device, str)):
                return None
    else:
        return None
    src_val, out_val = example_value(src), example_value(node)
    if isinstance(out_val, torch.Tensor):  # a Dynamo graph: trust the recorded result
        if not isinstance(src_val, torch.Tensor) or src_val.device != out_val.device:
            return None
        return src, out_val.dtype
    return (src, spec) if spec is not None else None


def _normalize_args(target, args, kwargs):
    sig = _SIGNATURES.get(target)
    if sig is None:
        return tuple(args), dict(kwargs)
    names = [n for n, _ in sig if n != "*"]
    n_positional = next((i for i, (n, _) in enumerate(sig) if n == "*"), len(sig))
    if len(args) > n_positional or any(k not in names for k in kwargs):
        return tuple(args), dict(kwargs)
    pos, kw = [], {}
    for i, (name, default) in enumerate(p for p in sig if p[0] != "*"):
        if i < len(args):
            value = args[i]
        elif name in kwargs:
            value = kwargs[name]
        elif default is _REQUIRED:
            return tuple(args), dict(kwargs)
        else:
            value = default
        if i < n_positional:
            pos.append(value)
        else:
            kw[name] = value
    if target in (torch.mean, torch.sum) and isinstance(pos[1], (list, tuple)) and len(pos[1]) == 1:
        pos[1] = pos[1][0]  # mean(x, [-1]) == mean(x, -1)
    if target in (torch.add, torch.sub) and kw.get("alpha") == 1:
        del kw["alpha"]  # the common case reads like plain `a + b`
    return tuple(pos), kw


def _default_slice(index):
    """``index`` (a getitem index: a slice, or a tuple of them and other items) with each slice
    that starts at 0 or steps by 1 forwards written with the defaults (None) instead."""
    if isinstance(index, tuple):
        return tuple(_default_slice(i) for i in index)
    if not isinstance(index, slice):
        return index
    start, stop, step = index.start, index.stop, index.step
    forwards = step is None or (type(step) is int and step > 0)
    if forwards and type(start) is int and start == 0:
        start = None
    if type(step) is int and step == 1:
        step = None
    return slice(start, stop, step)


def canonicalize(graph: fx.Graph) -> fx.Graph:
    """Rewrite ``graph`` in place into canonical form (see module docstring) and return it."""
    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        cast = _cast_dtype(node)
        if cast is not None:
            src, dtype = cast
            src_val = example_value(src)
            if isinstance(src_val, torch.Tensor) and src_val.dtype == dtype:
                node.replace_all_uses_with(src)
                graph.erase_node(node)
                continue
            node.op, node.target, node.args, node.kwargs = "call_function", CAST, (src, dtype), {}
            continue
        if node.op == "call_method":
            node.op, node.target = "call_function", _method_target(node.target)
        elif node.target in _OPERATOR_TO_TORCH and isinstance(
                example_value(node), (torch.SymInt, torch.SymFloat, int, float)):
            continue  # arithmetic on sizes (dynamic shapes): torch.* would make it a tensor
        else:
            node.target = canonical_target(node.target)
        if node.target is operator.getitem and len(node.args) == 2:
            node.args = (node.args[0], _default_slice(node.args[1]))
            continue
        if node.target is torch.mul and len(node.args) == 2 and node.args[0] is node.args[1] \
                and isinstance(node.args[0], fx.Node) and not node.kwargs:
            node.target, node.args = torch.pow, (node.args[0], 2)
            continue
        node.args, node.kwargs = _normalize_args(node.target, node.args, node.kwargs)
    graph.lint()
    return graph


def sizes_from_inputs(graph: fx.Graph) -> None:
    """Read sizes from the graph's inputs, not from the tensors computed inside it.

    Dynamo's flat graph reads a dynamic size from a graph input; inside a body (a layer
    compiled once, regions.py) it records ``x.size()`` on whichever tensor the model asked, e.g.
    ``hidden_states.shape[:-1]`` on the RMSNorm's output, which then escapes any fusion that
    does not return it (and torch 2.13 inlines a body called once into the graph around it).
    Each ``size(x)[i]`` / ``size(x, i)`` whose recorded value is a plain int
    becomes that int (the graph is specialized on it), and one that is a symbol that a body
    input carries (``s27``, passed in as an operand) reads that input: the same value."""
    symbols = {}
    for node in graph.nodes:
        value = example_value(node)
        if node.op == "placeholder" and isinstance(value, torch.SymInt):
            symbols.setdefault(value.node.expr, node)
    size = _method_target("size")
    reads = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        whole = node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
            and node.args[0].target is size and isinstance(node.args[1], int)
        if whole or (node.target is size and len(node.args) == 2):
            reads.append(node)
    for node in reads:
        value = example_value(node)
        if type(value) is int:
            node.replace_all_uses_with(value)
        elif isinstance(value, torch.SymInt) and value.node.expr in symbols:
            node.replace_all_uses_with(symbols[value.node.expr])
        else:
            continue
        source = node.args[0]
        graph.erase_node(node)
        if source.target is size and not source.users:
            graph.erase_node(source)


def restore_method_calls(graph: fx.Graph) -> None:
    """After the rewrite: call_function ``torch.Tensor.m`` back to call_method ``m``, the
    spelling Dynamo gave it (the same call). AOTAutograd's compile cache cannot key a
    call_function whose target is a method descriptor and skips its cache for any graph that
    has one (torch 2.13: every graph fastlora rewrote), so each run traced forward and
    backward again."""
    for node in graph.nodes:
        target = node.target
        name = getattr(target, "__name__", None)
        if node.op == "call_function" and name and node.args and \
                getattr(torch.Tensor, name, None) is target:
            node.op, node.target = "call_method", name
    graph.lint()
