"""Readable views of a compiled program: ``as_text`` and ``explain``."""
from __future__ import annotations

from ..core import Program, _ProgramPrinter, _fmt_param, source_text


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _fmt_time(t: float) -> str:
    return f"{t * 1e6:.1f} us" if t < 1e-3 else f"{t * 1e3:.2f} ms"


def global_text(program: Program, prop) -> str:
    """The global program with every value's sharding after its type."""
    pr = _ProgramPrinter()
    decl = lambda v, sh: f"{pr.name(v)}:{v.aval}{sh}"
    ins = " ".join(decl(v, sh) for v, sh in zip(program.in_vars, prop.in_shardings))
    lines = [f"{{ lambda {ins} ;"]
    for e, s in zip(program.eqns, prop.strategies):
        outs = " ".join(decl(v, sh) for v, sh in zip(e.outputs, s.outs))
        shown = {k: v for k, v in e.params.items() if not isinstance(v, Program)}
        params = ("[" + " ".join(f"{k}={_fmt_param(v)}" for k, v in shown.items()) + "]") if shown else ""
        args = " ".join(pr.name(a) for a in e.inputs)
        lines.append(f"    {outs} = {e.prim.name}{params} {args}")
    outs = " ".join(f"{pr.name(a)}{sh}" for a, sh in zip(program.out_vars, prop.out_shardings))
    lines.append(f"  in ({outs}) }}")
    return "\n".join(lines)


def explain_text(inserted, mesh, name: str) -> str:
    head = (f"jit({name}) on mesh {dict(zip(mesh.axis_names, mesh.axis_sizes))}: "
            f"{len(inserted)} collective{'s' if len(inserted) != 1 else ''} inserted")
    if not inserted:
        return head + "."
    total_b = sum(i.nbytes for i in inserted)
    total_t = sum(i.time for i in inserted)
    lines = [head + f", {_fmt_bytes(total_b)} per device, est. {_fmt_time(total_t)}:"]
    for k, i in enumerate(inserted):
        st = i.step
        at = f"eqn {i.eqn_index}" if i.eqn_index is not None else "output"
        lines.append(f"  [{k}] {st.kind}({','.join(st.axes)}) at {at}: {i.where}")
        if i.source is not None:
            lines.append(f"      from {source_text(i.source)}")
        lines.append(f"      {st.src} -> {st.dst}; {_fmt_bytes(st.nbytes)} per device, est. "
                     f"{_fmt_time(st.time)}")
        lines.append(f"      why: {i.why}")
    return "\n".join(lines)
