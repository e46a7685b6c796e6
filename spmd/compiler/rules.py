"""Sharding rules, derived from what each primitive declares (``spmd.core.Primitive.RULES``):
its ``category``, ``linear``, ``multilinear`` and ``monoid``, and for a per-device region its
``manual`` rule.  No primitive is named here.

A rule proposes *strategies*: the sharding each input must have and the sharding of each
output.  Most categories are described by a **dim map** (which output dim each input dim
becomes; unmapped dims must be replicated), from which forward images and backward
requirements follow mechanically.  Pending reductions follow the algebra:

- jointly linear (``linear``: add, sub, neg, reshape, transpose, slice, pad, concatenate,
  reduce_sum, ...): all linear operands pending the same sum -> the result pends that sum (a
  literal zero is the parts of any sum);
- linear in one operand at a time (``multilinear``: mul, div by a replicated value,
  dot_general, take, ...): one operand pending -> the result pends;
- the ``monoid`` max or min itself (max, reduce_max, ...): all operands pending the same max
  -> the result pends it;
- anything else forces the reduction first (the planner inserts the psum).

Reductions over a sharded dim, contractions over a dim sharded on both sides, and lookups in
a row-sharded table (a masked local ``take``) produce pending reductions.
"""
from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

from .. import _cache
from ..core import Literal
from .placements import Sharding


@dataclasses.dataclass(frozen=True)
class Strategy:
    ins: tuple        # required Sharding per input
    outs: tuple       # Sharding per output
    variant: str = ""   # lowering variant: "masked" for a lookup in a sharded table

    def parallelism(self, sizes) -> int:
        """Over how many devices the work is split: the most of any operand or result.  A
        pending sum does not count: an elementwise op on a pending value repeats the whole
        block on every device; a reduction or a contraction that leaves a sum pending split
        their input, which counts."""
        return max((math.prod(sizes[a] for a in sh.used_axes) for sh in self.ins + self.outs),
                   default=1)


def category(prim) -> str:
    return prim.category or "opaque"


def _rank(a):
    return len(a.aval.shape)


def _is_zero_lit(a):
    return isinstance(a, Literal) and np.ndim(a.val) == 0 and a.val == 0


# ---------------------------------------------------------------------------------------------
# dim maps: input dim -> output dim (None: must be replicated)
# ---------------------------------------------------------------------------------------------

def _reshape_groups(src, dst):
    """Pairs (src_dim, dst_dim) that head a group of dims with equal products."""
    pairs = []
    i = j = 0
    while i < len(src) and j < len(dst):
        if src[i] == 1:
            i += 1
            continue
        if dst[j] == 1:
            j += 1
            continue
        gi, gj = [i], [j]
        pi, pj = src[i], dst[j]
        while pi != pj:
            if pi < pj:
                i += 1
                pi *= src[i]
                gi.append(i)
            else:
                j += 1
                pj *= dst[j]
                gj.append(j)
        pairs.append((gi[0], gj[0], src[gi[0]], dst[gj[0]]))
        i, j = i + 1, j + 1
    return pairs


def dim_maps(e) -> list[tuple]:
    """For each input, a tuple mapping each of its dims to an output dim or None."""
    cat = category(e.prim)
    p = e.params
    ins = e.inputs
    out = e.outputs[0].aval if e.outputs else None
    none = lambda a: (None,) * _rank(a)
    if cat == "elementwise":
        r = out.ndim
        return [tuple((i + r - _rank(a)) if a.aval.shape[i] == out.shape[i + r - _rank(a)] else None
                      for i in range(_rank(a))) for a in ins]
    if cat == "broadcast":
        x = ins[0].aval
        return [tuple(d if x.shape[i] == out.shape[d] else None for i, d in enumerate(p["dims"]))]
    if cat == "transpose":
        perm = p["perm"]
        return [tuple(perm.index(i) for i in range(len(perm)))]
    if cat == "reshape":
        m = [None] * _rank(ins[0])
        for i, j, _, _ in _reshape_groups(ins[0].aval.shape, out.shape):
            m[i] = j
        return [tuple(m)]
    if cat == "slice":
        x = ins[0].aval
        return [tuple(d if s == (0, n, 1) else None for d, (s, n) in enumerate(zip(p["index"], x.shape)))]
    if cat == "pad":
        return [tuple(d if c == (0, 0) else None for d, c in enumerate(p["config"])), ()]
    if cat == "concatenate":
        return [tuple(None if d == p["axis"] else d for d in range(_rank(a))) for a in ins]
    if cat == "reduction":
        axes = p["axes"]
        kept = [d for d in range(_rank(ins[0])) if d not in axes]
        return [tuple(kept.index(d) if d in kept else None for d in range(_rank(ins[0])))]
    if cat in ("scan",):
        return [tuple(None if d == p["axis"] else d for d in range(_rank(ins[0])))]
    if cat == "arg":
        ax = p["axis"]
        return [tuple(None if d == ax else d - (d > ax) for d in range(_rank(ins[0])))]
    if cat == "gather":            # take: the index's dims replace the axis
        ax, ni = p["axis"], _rank(ins[1])
        xm = tuple(None if d == ax else d if d < ax else d + ni - 1 for d in range(_rank(ins[0])))
        return [xm, tuple(ax + j for j in range(ni))]
    if cat == "window":            # dynamic_slice: dims cut to a window must be whole
        x = ins[0].aval
        return [tuple(d if s == n else None for d, (s, n) in enumerate(zip(p["sizes"], x.shape)))] + \
            [()] * (len(ins) - 1)
    if cat == "scatter":           # scatter_add along an axis
        ax, ni = p["axis"], _rank(ins[1])
        xm = tuple(None if d == ax else d for d in range(_rank(ins[0])))
        um = tuple(d if d < ax else None if d < ax + ni else d - ni + 1 for d in range(_rank(ins[2])))
        return [xm, none(ins[1]), um]
    if cat == "window_update":     # dynamic_update_slice
        x, u = ins[0].aval, ins[1].aval
        m = tuple(d if u.shape[d] == x.shape[d] else None for d in range(x.ndim))
        return [m, m] + [()] * (len(ins) - 2)
    if cat == "constraint":
        return [tuple(range(_rank(ins[0])))]
    return [none(a) for a in ins]


def _image(sh: Sharding, m, out_rank) -> tuple:
    dims = [()] * out_rank
    for i, d in enumerate(m):
        if d is not None:
            dims[d] = sh.dims[i]
    return tuple(dims)


def _preimage(out_dims, m, keep=None, fill=()) -> tuple:
    return tuple(out_dims[d] if d is not None else (keep[i] if keep else fill) for i, d in enumerate(m))


# A preferred sharding may leave dims open: they take whatever the producer gives them.
UNKNOWN = ("?",)


def resolve_hint(hint: Sharding, given: Sharding) -> Sharding:
    """``hint`` with its open dims taken from ``given`` (where that does not reuse an axis)."""
    if UNKNOWN not in hint.dims:
        return hint
    fixed = {a for axes in hint.dims if axes != UNKNOWN for a in axes}
    dims = tuple((g if not (set(g) & fixed) else ()) if h == UNKNOWN else h
                 for h, g in zip(hint.dims, given.dims))
    return Sharding(dims)


def known_dims(hint: Sharding) -> tuple:
    return tuple(() if d == UNKNOWN else d for d in hint.dims)


def backward_hints(e, out_hints) -> list:
    """Preferred input shardings given preferred output shardings (None where unknown)."""
    h = out_hints[0] if out_hints else None
    if h is None:
        return [None] * len(e.inputs)
    if category(e.prim) == "contraction":
        xm, ym = _dot_maps(e)
        return [Sharding(_preimage(h.dims, xm, fill=UNKNOWN)), Sharding(_preimage(h.dims, ym, fill=UNKNOWN))]
    if category(e.prim) == "opaque":
        return [None] * len(e.inputs)
    return [Sharding(_preimage(h.dims, m, fill=UNKNOWN)) if len(m) else None for m in dim_maps(e)]


# ---------------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------------

def _valid(sh: Sharding, shape, sizes, even=False) -> bool:
    used = [a for axes in sh.dims for a in axes]
    if len(set(used)) != len(used) or set(used) & sh.partial_axes:
        return False
    return not even or sh.is_even(shape, sizes)


def _partial_choices(e, cur) -> list[tuple]:
    """(required partial per input, output partial) pairs this primitive allows, given the
    inputs' current pending reductions; the first is always 'reduce everything first'."""
    n = len(e.inputs)
    choices = [((),) * n + ((),)]
    parts = [c.partial if c is not None else () for c in cur]
    joint = [("sum", e.prim.linear_operands(n, e.params))]
    if e.prim.monoid in ("max", "min"):
        joint.append((e.prim.monoid, tuple(range(n))))
    for op, operands in joint:
        pending = [i for i in operands if not (op == "sum" and _is_zero_lit(e.inputs[i]))]
        ps = {parts[i] for i in pending}
        if len(ps) == 1 and ps != {()} and all(o == op for _, o in next(iter(ps))):
            p = next(iter(ps))
            choices.append(tuple(p if i in pending else () for i in range(n)) + (p,))
    for i in e.prim.multilinear:
        if i < n and parts[i] and all(op == "sum" for _, op in parts[i]) and \
                not any(parts[j] for j in range(n) if j != i):
            choices.append(tuple(parts[i] if j == i else () for j in range(n)) + (parts[i],))
    return choices


_MEMO = _cache.LRU()


def strategies(e, cur: list, hints: list, sizes: dict) -> list[Strategy]:
    """Candidate strategies for equation ``e`` whose inputs currently have shardings ``cur``
    (memoized: programs repeat the same layer many times)."""
    try:
        key = (e.prim, e.params,
               tuple((isinstance(a, Literal), _is_zero_lit(a), a.aval) for a in e.inputs),
               tuple(v.aval for v in e.outputs), tuple(cur), tuple(hints), tuple(sizes.items()))
        hash(key)
    except TypeError:
        return _strategies(e, cur, hints, sizes)
    hit = _MEMO.get(key)
    if hit is None:
        hit = _strategies(e, cur, hints, sizes)
        _MEMO.put(key, hit)
    return hit


def _strategies(e, cur: list, hints: list, sizes: dict) -> list[Strategy]:
    cat = category(e.prim)
    if cat == "contraction":
        return _dot_strategies(e, cur, hints, sizes)
    outs = [v.aval for v in e.outputs]
    ins = [a.aval for a in e.inputs]
    region = e.prim.manual(e.params) if e.prim.manual is not None else None
    if region is not None and dict(zip(region[0].axis_names, region[0].axis_sizes)) == sizes:
        # a per-device region over the same mesh: its specs are its strategy, its body is inlined
        _, in_specs, out_specs, _ = region
        return [Strategy(tuple(Sharding.from_spec(sp, a.ndim) for sp, a in zip(in_specs, ins)),
                         tuple(Sharding.from_spec(sp, o.ndim) for sp, o in zip(out_specs, outs)),
                         "inline")]
    if cat == "opaque":
        return [Strategy(tuple(Sharding.replicated(a.ndim) for a in ins),
                         tuple(Sharding.replicated(o.ndim) for o in outs))]
    if cat == "constraint":
        want = e.params["sharding"]
        return [Strategy((want,), (want,))]
    maps = dim_maps(e)
    out = outs[0]
    even = cat == "reshape"
    cands = [((),) * out.ndim]
    for c, m in zip(cur, maps):
        if c is not None and len(m):
            cands.append(_image(c, m, out.ndim))
    for h in hints:
        if h is not None:
            cands.append(known_dims(h))
            for c, m in zip(cur, maps):
                if c is not None and len(m):
                    cands.append(resolve_hint(h, Sharding(_image(c, m, out.ndim))).dims)
    reduce_op = e.prim.monoid if cat == "reduction" else None
    masked_take = cat == "gather"
    scatter_add = cat == "scatter"
    pchoices = _partial_choices(e, cur)
    result = []
    seen = set()
    for dims in dict.fromkeys(cands):
        # variants for dims that vanish: keep their sharding (-> pending reduction) or gather
        keep_variants = [None]
        if reduce_op in ("sum", "max", "min") and cur[0] is not None:
            keep_variants.append("keep")
        if (masked_take or scatter_add) and cur[0] is not None and cur[0].dims[e.params["axis"]]:
            keep_variants.append("keep")
        for keep in keep_variants:
            for pin in pchoices:
                odims = dims
                req = []
                for i, (a, m) in enumerate(zip(ins, maps)):
                    if not len(m) and a.ndim:
                        req.append(Sharding.replicated(a.ndim))
                        continue
                    keepd = None
                    if keep and i == 0:
                        keepd = tuple(cur[0].dims[d] if m[d] is None else () for d in range(a.ndim))
                    req.append(Sharding(_preimage(odims, m, keepd), pin[i]))
                opart = set(pin[-1])
                variant = ""
                if keep:
                    vanished = {ax for d, mm in enumerate(maps[0]) if mm is None for ax in req[0].dims[d]}
                    if reduce_op:
                        opart |= {(ax, reduce_op) for ax in vanished}
                    elif masked_take:
                        if e.inputs[1].aval.ndim and any(req[1].dims):
                            if set(a for ax in req[1].dims for a in ax) & vanished:
                                continue
                        opart |= {(ax, "sum") for ax in vanished}
                        variant = "masked"
                    else:
                        variant = "masked"
                        dims_o = list(odims)
                        dims_o[e.params["axis"]] = req[0].dims[e.params["axis"]]
                        odims = tuple(dims_o)
                if cat != "broadcast":
                    covered = {d for m in maps for d in m if d is not None}
                    odims = tuple(ax if d in covered or (variant and d == e.params.get("axis")) else ()
                                  for d, ax in enumerate(odims))
                osh = Sharding(tuple(odims), tuple(sorted(opart)))
                if not _valid(osh, out.shape, sizes, even) or not all(
                        _valid(r, a.shape, sizes, even) for r, a in zip(req, ins)):
                    continue
                s = Strategy(tuple(req), (osh,) * len(outs), variant)
                if s not in seen:
                    seen.add(s)
                    result.append(s)
    if scatter_add:
        result += [s for s in _split_index_scatter(e, cur, ins, out, sizes) if s not in seen]
    return result


def _split_index_scatter(e, cur, ins, out, sizes) -> list[Strategy]:
    """``scatter_add`` with its indices split (an embedding's gradient over a split batch):
    each device adds its own updates into the operand, and the result is a sum pending over the
    indices' axes (the operand, masked to one device, counted once) -- a reduction of the
    operand's size instead of gathering the updates."""
    if cur[1] is None or not any(cur[1].dims) or e.inputs[1].aval.ndim == 0:
        return []
    ax, idx = e.params["axis"], cur[1].dims
    axes = {a for d in idx for a in d}
    upd = [()] * ins[2].ndim
    for j, d in enumerate(idx):
        upd[ax + j] = d
    part = tuple(sorted((a, "sum") for a in axes))
    req = (Sharding(((),) * ins[0].ndim, part), Sharding(tuple(idx)), Sharding(tuple(upd)))
    osh = Sharding(((),) * out.ndim, part)
    if not (_valid(osh, out.shape, sizes) and all(_valid(r, a.shape, sizes)
                                                  for r, a in zip(req, ins))):
        return []
    return [Strategy(req, (osh,))]


# ---------------------------------------------------------------------------------------------
# contraction: from the dot_general subscripts
# ---------------------------------------------------------------------------------------------

def _dot_maps(e):
    """Output dim of each x dim and y dim (None for contracting dims)."""
    (xc, yc), (xb, yb) = e.params["contract"], e.params["batch"]
    x, y = e.inputs[0].aval, e.inputs[1].aval
    xf = [i for i in range(x.ndim) if i not in xc + xb]
    yf = [j for j in range(y.ndim) if j not in yc + yb]
    xm = [None] * x.ndim
    ym = [None] * y.ndim
    for k, (i, j) in enumerate(zip(xb, yb)):
        xm[i] = ym[j] = k
    for k, i in enumerate(xf):
        xm[i] = len(xb) + k
    for k, j in enumerate(yf):
        ym[j] = len(xb) + len(xf) + k
    return tuple(xm), tuple(ym)


def _dot_strategies(e, cur, hints, sizes):
    (xc, yc), _ = e.params["contract"], e.params["batch"]
    xa, ya, oa = e.inputs[0].aval, e.inputs[1].aval, e.outputs[0].aval
    xm, ym = _dot_maps(e)
    # labels: ("o", out dim) for batch/free dims, ("c", k) for the k-th contracting pair
    xl = [("o", m) if m is not None else ("c", xc.index(i)) for i, m in enumerate(xm)]
    yl = [("o", m) if m is not None else ("c", yc.index(j)) for j, m in enumerate(ym)]
    cx, cy = cur
    cx = cx or Sharding.replicated(xa.ndim)
    cy = cy or Sharding.replicated(ya.ndim)
    h = hints[0] if hints else None
    options = {}
    order = {}
    for a in sizes:
        opts = [None]
        for sh, labels in ((cx, xl), (cy, yl)):
            for d, axes in enumerate(sh.dims):
                if a in axes:
                    opts.append(labels[d])
                    order.setdefault(labels[d], []).append((axes.index(a), a))
        if h is not None:
            for d, axes in enumerate(h.dims):
                if a in axes:
                    opts.append(("o", d))
        if cx.partial_op(a) == "sum":
            opts.append(("px",))
        if cy.partial_op(a) == "sum":
            opts.append(("py",))
        options[a] = list(dict.fromkeys(opts))
    axes_names = list(sizes)
    result = []
    for combo in itertools.product(*[options[a] for a in axes_names]):
        by_label: dict = {}
        px, py, pout = [], [], []
        for a, lab in zip(axes_names, combo):
            if lab is None:
                continue
            if lab == ("px",):
                px.append((a, "sum"))
                pout.append((a, "sum"))
            elif lab == ("py",):
                py.append((a, "sum"))
                pout.append((a, "sum"))
            else:
                by_label.setdefault(lab, []).append(a)
                if lab[0] == "c":
                    pout.append((a, "sum"))
        mesh_order = {a: i for i, a in enumerate(axes_names)}
        for lab, axs in by_label.items():
            pos = dict((a, p) for p, a in order.get(lab, []))
            axs.sort(key=lambda a: (pos.get(a, 99), mesh_order[a]))
        xs = Sharding(tuple(tuple(by_label.get(l, ())) for l in xl), tuple(sorted(px)))
        ys = Sharding(tuple(tuple(by_label.get(l, ())) for l in yl), tuple(sorted(py)))
        os_ = Sharding(tuple(tuple(by_label.get(("o", d), ())) for d in range(oa.ndim)), tuple(sorted(pout)))
        result.append(Strategy((xs, ys), (os_,)))
    return result


def contraction_flops(e, s: Strategy, sizes) -> float:
    """Per-device flops of a dot_general under strategy ``s``."""
    (xc, _), _ = e.params["contract"], e.params["batch"]
    out = s.outs[0].local_shape(e.outputs[0].aval.shape, sizes)
    xl = s.ins[0].local_shape(e.inputs[0].aval.shape, sizes)
    return 2.0 * math.prod(out) * math.prod(xl[i] for i in xc)

