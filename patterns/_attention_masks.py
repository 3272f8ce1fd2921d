"""Proving what an attention mask is (used by patterns/attention.py).

``prove_mask`` evaluates the graph that built a mask symbolically: aranges become query / key
indices, comparisons become linear constraints, and reads of position ids, document ids (HF's
``packed_sequence_mask``) or a boolean padding mask stay symbolic. Causal, sliding-window,
document and key-padding (``padding[b, kv]``, HF's ``padding_mask_function``) constraints are
recognised; anything else raises ``Reject`` with the reason.

Under gradient checkpointing the mask enters each decoder layer as a placeholder: the prover
follows it out of the layer with patterns/_checkpoint_bodies.py.
"""
from __future__ import annotations

import operator
from typing import NamedTuple, Optional

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fastlora.canonicalize import CAST, example_value
from fastlora.matcher import describe
from fastlora.pattern import Reject
from fastlora.patterns._checkpoint_bodies import _outside, _Unknown, outer_value

# ---------------------------------------------------------------- proving what a mask is


class Lin:
    """An integer tensor as sum(coef * atom) + const. Atoms: ("axis", k), the index along
    dimension k of the tensor described; ("read", node, forms): the run-time integer (or bool)
    tensor ``node`` read at index forms (Lins), one per dimension of ``node``."""

    __slots__ = ("terms", "const")

    def __init__(self, terms=None, const=0):
        self.terms = {a: c for a, c in (terms or {}).items() if c}
        self.const = const

    def key(self):
        return frozenset(self.terms.items()), self.const

    def __eq__(self, other):
        return isinstance(other, Lin) and self.key() == other.key()

    def __hash__(self):
        return hash(self.key())

    def plus(self, other, sign=1):
        other = other if isinstance(other, Lin) else Lin(const=other)
        terms = dict(self.terms)
        for a, c in other.terms.items():
            terms[a] = terms.get(a, 0) + sign * c
        return Lin(terms, self.const + sign * other.const)

    def times(self, s):
        return Lin({a: c * s for a, c in self.terms.items()}, self.const * s)

    def sub_axes(self, f):
        """Replace each ("axis", k) by the Lin f(k), inside reads too."""
        out = Lin(const=self.const)
        for atom, c in self.terms.items():
            if atom[0] == "axis":
                out = out.plus(f(atom[1]).times(c))
            else:
                out = out.plus(Lin({("read", atom[1], tuple(i.sub_axes(f) for i in atom[2])): c}))
        return out

    def __str__(self):
        names = {("axis", 0): "b", ("axis", 1): "h", ("axis", 2): "q", ("axis", 3): "kv"}
        text = "".join(f" {'-' if c < 0 else '+'} {str(abs(c)) + '*' if abs(c) != 1 else ''}"
                       f"{names.get(a) or a[1].name + '[..]'}" for a, c in self.terms.items())
        if self.const or not self.terms:
            text += f" {'-' if self.const < 0 else '+'} {abs(self.const)}"
        return text[3:] if text[1] == "+" else "-" + text[3:]


def _axis(k: int) -> Lin:
    return Lin({("axis", k): 1})


def _subst(value, f):
    """An axis substitution applied to a Lin, a set of constraints, or a Python literal."""
    if isinstance(value, Lin):
        return value.sub_axes(f)
    if isinstance(value, frozenset):
        return frozenset((kind, x.sub_axes(f)) for kind, x in value)
    return value


def _ndim(node) -> int:
    v = example_value(node)
    return v.dim() if isinstance(v, torch.Tensor) else 0


_COMPARE = {getattr(owner, name): name for name in ("le", "lt", "ge", "gt", "eq")
            for owner in (operator, torch, torch.Tensor)}
_AND = (operator.and_, torch.bitwise_and, torch.logical_and, torch.Tensor.__and__)
_VIEWS = (torch.Tensor.expand, torch.Tensor.contiguous, CAST)


class _Prover:
    """Symbolic evaluation of a mask-building graph. Integer tensors become Lins; boolean
    tensors become sets of constraints, all of which hold where the mask is True: ("le", L) for
    L <= 0, ("eq", L) for L == 0, ("true", L) for a read of a run-time bool tensor (L = read)."""

    def __init__(self):
        self.memo = {}

    def eval(self, node):
        if not isinstance(node, fx.Node):
            if isinstance(node, int):
                return node
            raise _Unknown(f"the literal {node!r}")
        if node not in self.memo:
            value, shape = self._eval(node), getattr(example_value(node), "shape", ())
            # Along a dimension of size 1 the index is 0 (broadcasting repeats that value).
            self.memo[node] = _subst(value, lambda k: Lin() if isinstance(shape[k], int)
                                     and shape[k] == 1 else _axis(k))
        return self.memo[node]

    def aligned(self, node, arg):
        """``arg``'s value with its dimensions right-aligned to ``node``'s (broadcasting)."""
        value, shift = self.eval(arg), _ndim(node) - _ndim(arg)
        return _subst(value, lambda k: _axis(k + shift)) if shift else value

    def ints(self, node, arg) -> Lin:
        value = self.aligned(node, arg)
        if isinstance(value, bool) or not isinstance(value, (int, Lin)):
            raise _Unknown(f"{describe(arg)} used as an integer")
        return value if isinstance(value, Lin) else Lin(const=value)

    def bools(self, node, arg) -> frozenset:
        value = self.aligned(node, arg)
        if value is True:
            return frozenset()
        if not isinstance(value, frozenset):
            raise _Unknown(f"{describe(arg)} used as a boolean")
        return value

    def _eval(self, n):
        if n.op == "placeholder":  # a mask passed into a checkpointed layer: where it was built
            return self.eval(outer_value(n))
        if n.op != "call_function":
            raise _Unknown(describe(n))
        t, a, kw = n.target, n.args, n.kwargs
        if t is torch.arange and len(a) in (1, 2) and set(kw) <= {"device", "dtype"} and \
                not (kw.get("dtype") or torch.int64).is_floating_point:
            start = a[0] if len(a) == 2 else 0
            if not isinstance(start, int):
                raise _Unknown(describe(n))
            return _axis(0).plus(start)
        if t in (torch.add, torch.sub) and not kw:
            return self.ints(n, a[0]).plus(self.ints(n, a[1]), 1 if t is torch.add else -1)
        if t in _COMPARE and len(a) == 2 and not kw:
            d = self.ints(n, a[0]).plus(self.ints(n, a[1]), -1)  # integers: a < b <=> a-b+1 <= 0
            return frozenset({{"le": ("le", d), "lt": ("le", d.plus(1)), "ge": ("le", d.times(-1)),
                               "gt": ("le", d.times(-1).plus(1)), "eq": ("eq", d)}[_COMPARE[t]]})
        if t in _AND and len(a) == 2 and not kw:
            return self.bools(n, a[0]) | self.bools(n, a[1])
        if t is torch.Tensor.new_ones and a[1:] in (((),), ([],)) and kw == {"dtype": torch.bool}:
            return frozenset()
        if t in _VIEWS:
            out, src = example_value(n).dtype, example_value(a[0]).dtype
            if t is CAST and (out.is_floating_point or (out == torch.bool) != (src == torch.bool)):
                raise _Unknown(describe(n))
            return self.aligned(n, a[0])
        if t is torch.unsqueeze and len(a) == 2:
            d = a[1] % _ndim(n)
            return _subst(self.eval(a[0]), lambda k: _axis(k + (k >= d)))
        if t is operator.getitem:
            return self._getitem(n, a[0], a[1] if isinstance(a[1], tuple) else (a[1],))
        raise _Unknown(describe(n))

    def _getitem(self, n, base, index):
        if any(isinstance(i, fx.Node) for i in index):  # advanced indexing: a read
            if not all(isinstance(i, fx.Node) for i in index) or len(index) != _ndim(base):
                raise _Unknown(describe(n))
            forms = tuple(self.ints(n, i) for i in index)
            try:
                known = self.eval(base)  # built from aranges (positions 0..S-1): substitute
            except _Unknown:
                known = None
            if isinstance(known, Lin):
                return known.sub_axes(lambda k: forms[k])
            dtype = example_value(base).dtype
            if known is not None or dtype.is_floating_point or dtype.is_complex:
                raise _Unknown(describe(n))
            read = Lin({("read", base, forms): 1})
            return frozenset({("true", read)}) if dtype == torch.bool else read
        rank, used = _ndim(base), sum(i is not None and i is not Ellipsis for i in index)
        full = []
        for i in index if Ellipsis in index else tuple(index) + (Ellipsis,):
            full += [slice(None)] * (rank - used) if i is Ellipsis else [i]
        mapping, new = {}, 0
        for i in full:
            if i is None:
                new += 1
            elif isinstance(i, slice) and i.step in (None, 1) and isinstance(i.start or 0, int) \
                    and (i.start or 0) >= 0:
                mapping[len(mapping)] = _axis(new).plus(i.start or 0)
                new += 1
            elif isinstance(i, int) and not isinstance(i, bool) and i >= 0:
                mapping[len(mapping)] = Lin(const=i)
            else:
                raise _Unknown(describe(n))
        try:
            value = self.eval(base)
        except _Unknown:  # a run-time tensor (a padding mask): read at the mapped indices
            dtype = example_value(base).dtype
            if dtype.is_floating_point or dtype.is_complex:
                raise
            read = Lin({("read", base, tuple(mapping[k] for k in range(rank))): 1})
            return frozenset({("true", read)}) if dtype == torch.bool else read
        return _subst(value, lambda k: mapping[k])


def _root(node):
    node = _outside(node)
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _VIEWS:
        node = _outside(node.args[0])
    return node


def _positions_of_documents(doc):
    """The position ids HF's ``find_packed_sequence_indices`` computed ``doc`` from:
    ``cumsum(diff(pos, prepend=pos[:, :1] - 1) != 1)``, a new document wherever positions do
    not step by exactly 1. Reject if ``doc`` was computed any other way."""
    d = _root(doc)
    ok = d.op == "call_function" and d.target in (torch.Tensor.cumsum, torch.cumsum) and \
        d.args[1:] in ((-1,), (1,)) and not d.kwargs
    ne = d.args[0] if ok else None
    ok = ok and isinstance(ne, fx.Node) and ne.target in (operator.ne, torch.ne) and \
        ne.args[1] == 1
    diff = ne.args[0] if ok else None
    ok = ok and isinstance(diff, fx.Node) and diff.target is torch.diff and len(diff.args) == 1 \
        and set(diff.kwargs) == {"prepend", "dim"} and diff.kwargs["dim"] in (-1, 1)
    first = diff.kwargs["prepend"] if ok else None
    ok = ok and isinstance(first, fx.Node) and first.target is torch.sub and first.args[1] == 1
    head = first.args[0] if ok else None
    ok = ok and isinstance(head, fx.Node) and head.target is operator.getitem and \
        head.args[1] == (slice(None), slice(None, 1)) and _root(head.args[0]) is _root(diff.args[0])
    if not ok:
        raise Reject(f"the mask compares the ids in {describe(doc)}, which fastlora cannot trace "
                     "back to HF's packed-sequence detection on position ids")
    return diff.args[0]


def _is_arange(positions) -> bool:
    try:
        value = _Prover().eval(positions)
    except _Unknown:
        return False
    return _ndim(positions) == 2 and isinstance(value, Lin) and value.terms == {("axis", 1): 1}


def _is_zero(value) -> bool:
    """A literal 0, ``torch.zeros(())``, or ``torch.tensor(0.0)`` (transformers 5.17)."""
    if not isinstance(value, fx.Node):
        return value == 0
    if value.op != "call_function" or not set(value.kwargs) <= {"device", "dtype"}:
        return False
    if value.target is torch.zeros:
        return value.args in (((),), ([],))
    return value.target is torch.tensor and len(value.args) == 1 and \
        type(value.args[0]) in (int, float) and value.args[0] == 0


def _as_bool_mask(mask):
    """An additive float mask ``where(cond, 0, very negative)`` as (its boolean ``cond``, the
    negative value)."""
    ok = mask.op == "call_function" and mask.target is torch.where and len(mask.args) == 3 \
        and not mask.kwargs
    if ok:
        cond, zero, neg = mask.args
        if _is_zero(zero) and isinstance(neg, float) and neg <= -1e4 and \
                example_value(cond).dtype == torch.bool:
            return cond, neg
    raise Reject(f"the additive mask {describe(mask)} is not `where(mask, 0, -big)`, so fastlora "
                 "cannot tell which keys it hides")


# An additive mask value at or below this swallows any score: s + neg == neg exactly in float32
# and bfloat16 (HF uses the dtype's minimum, -3.4e38), so a row that sees no key gets equal
# scores everywhere and softmax makes it uniform, which the kernel reproduces.
SWALLOWS_SCORES = -1e30


class ProvenMask(NamedTuple):
    """What a proven mask is, in the kernel's terms."""
    causal: bool
    window: int  # 0: none
    docs: Optional[fx.Node]  # the document ids compared (HF's packed-sequence cumsum)
    key_mask: Optional[fx.Node]  # a 2-D bool tensor: the keys kept (HF's padding mask)
    key_mask_rows: str  # "batch": batch row b reads its row b; "first": every b reads row 0
    empty_rows_uniform: bool  # a row that sees no key attends to every key, 1 / S_k each


def _key_padding(read):
    """(the boolean tensor, "batch" or "first") that the constraint ``read`` (a read of a
    run-time bool tensor, which must hold) reads at [b, kv] or [0, kv]: a key-padding mask, of
    which eager reads rows 0..B-1 (or row 0 for every b) and columns 0..S_k-1. Reject anything
    else."""
    (atom,) = read.terms
    base, forms = atom[1], atom[2]
    if len(forms) != 2 or forms[0] not in (_axis(0), Lin()) or forms[1] != _axis(3):
        where = ", ".join(str(f) for f in forms)
        raise Reject(f"the mask also reads the boolean tensor {describe(_root(base))} at "
                     f"[{where}] (b: batch, q: query index, kv: key index), which is not a "
                     "key-padding mask `padding[b, kv]`")
    return base, "batch" if forms[0] == _axis(0) else "first"


def prove_mask(mask, q_shape, k_shape) -> ProvenMask:
    """What the attention mask ``mask`` is (ProvenMask), or Reject with the reason."""
    val = example_value(mask)
    if not isinstance(val, torch.Tensor) or val.dim() > 4 or \
            (val.dim() >= 3 and val.shape[-3] != 1):
        raise Reject("the attention mask is not one (batch, 1, q, kv) mask shared by all heads")
    neg = None  # the additive mask's value for hidden keys
    if val.dtype != torch.bool:
        mask, neg = _as_bool_mask(_outside(mask))
    try:
        cons = _Prover().eval(mask)
    except _Unknown as e:
        raise Reject(f"the attention mask is built with {e}, which fastlora cannot prove is a "
                     "causal, sliding-window or packed-document mask") from None
    if cons is True:
        cons = frozenset()
    if not isinstance(cons, frozenset):
        raise Reject("the attention mask is not a boolean condition on positions")
    shift = 4 - val.dim()
    cons = _subst(cons, lambda k: _axis(k + shift))
    batch, q_idx, kv_idx = ({_axis(0), Lin()}, _axis(2), _axis(3))
    docs, positions, rest = None, None, []
    for kind, x in cons:
        reads = [a for a in x.terms if a[0] == "read"] if kind == "eq" else []
        if kind == "eq" and x.const == 0 and len(x.terms) == 2 and len(reads) == 2 and \
                reads[0][1] is reads[1][1] and sorted(x.terms.values()) == [-1, 1] and \
                {r[2][1] for r in reads} == {q_idx, kv_idx} and all(r[2][0] in batch
                                                                    for r in reads):
            pos = _positions_of_documents(reads[0][1])
            if _is_arange(pos):
                continue  # positions 0..S-1 in every row: one document per row
            if docs is not None and _root(docs) is not _root(reads[0][1]):
                raise Reject("the mask combines two different document-id tensors")
            docs, positions = reads[0][1], _root(pos)
            continue
        rest.append((kind, x))
    causal, window, key_mask, key_rows = False, 0, None, "batch"
    for kind, x in rest:
        if kind == "true":
            base, rows = _key_padding(x)
            if key_mask is not None and (_root(key_mask) is not _root(base) or key_rows != rows):
                raise Reject("the mask combines two different padding masks")
            key_mask, key_rows = base, rows
            continue
        if positions is not None:  # within one document, positions step by 1 like indices
            pos_reads = {a: c for a, c in x.terms.items()
                         if a[0] == "read" and _root(a[1]) is positions}
            if pos_reads and (sum(pos_reads.values()) != 0 or not all(
                    a[2][0] in batch and a[2][1] in (q_idx, kv_idx) for a in pos_reads)):
                raise Reject(f"the mask constraint {x} <= 0 reads positions in a way that is "
                             "not a difference of two positions in one document")
            x = Lin({a: c for a, c in x.terms.items() if a not in pos_reads}, x.const)
            for a, c in pos_reads.items():
                x = x.plus(a[2][1].times(c))
        coef = (x.terms.get(("axis", 2), 0), x.terms.get(("axis", 3), 0))
        if kind == "le" and len(x.terms) == sum(c != 0 for c in coef):
            if coef == (0, 0) and x.const <= 0:
                continue
            if coef == (-1, 1) and x.const == 0:
                causal = True  # kv <= q
                continue
            if coef == (1, -1) and x.const <= 0:
                window = min(window or 1 - x.const, 1 - x.const)  # q - kv < 1 - const
                continue
        raise Reject(f"the mask constraint `{x} {'<=' if kind == 'le' else '=='} 0` (q: query "
                     "index, kv: key index) is not causal, sliding-window or same-document")
    if window and isinstance(q_shape[2], int) and window >= q_shape[2]:
        window = 0  # the window covers the whole sequence
    # Every row sees its own key unless keys are masked (or there are more queries than keys):
    # only then can a row see nothing, where the additive mask's value decides what it gets.
    empty_rows = key_mask is not None or not statically_known_true(q_shape[2] == k_shape[2])
    if empty_rows and neg is not None and neg > SWALLOWS_SCORES:
        raise Reject(f"the additive mask hides keys with {neg:g}, which does not swallow the "
                     "scores: a row that sees no key would attend with scores rounded to that "
                     "value's ulp, which the kernel does not reproduce (HF's masks use the "
                     "dtype's minimum: float32 or bfloat16, not float16)")
    return ProvenMask(causal, window, docs, key_mask, key_rows, empty_rows and neg is not None)

