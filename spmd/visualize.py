"""Pictures of layouts: which devices hold which block of an array, for arrays of any rank.

A picture is a list of header lines and one or more *panels*; a panel is a grid whose rows
and columns are the blocks of two dims of the array.  Rank 0 and 1 give one panel with one
row.  For rank 2 the grid is the whole array, as in JAX.  For rank >= 3 the grid shows the
last two sharded dims, and there is one panel per block of the other dims, titled like an
index (``x[0:4, :, :]``).  A cell names the devices that hold the block (``CPU 0,4``: that
block is replicated on devices 0 and 4); an uneven dim shows its real ranges in the headers
and a block past the end of the data is marked ``(empty)``.

The same picture renders three ways: coloured with ``rich`` in a terminal, as HTML in a
notebook, and as plain text (``sharding_text``) for tests and logs.

>>> import numpy as np, spmd
>>> mesh = spmd.make_mesh((2, 4), ("data", "model"))
>>> s = spmd.NamedSharding(mesh, spmd.P("data"))
>>> "CPU 0,1,2,3" in sharding_text(s, (8, 4))
True
"""
from __future__ import annotations

import dataclasses
import html
import io
import itertools
import math

import numpy as np
from rich import box
from rich.console import Console, Group
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from .errors import ShardingError
from . import mesh as _mesh_module
from .mesh import AbstractMesh, Mesh
from . import sharding as _sharding_module
from .sharding import NamedSharding, block_size, shard_range

# tab20, dark shades first, so that neighbouring blocks get clearly different colours.
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#7f7f7f", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896",
            "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5")
_EMPTY = -1  # the colour index of a block past the end of the data


@dataclasses.dataclass
class _Panel:
    title: str | None
    corner: str                       # header of the row-label column
    col_labels: list[str] | None      # None: no header row (rank 0)
    row_labels: list[str] | None      # None: no row-label column (rank 0 and 1)
    cells: list[list[tuple[str, int]]]  # (text, colour index) per row and column


@dataclasses.dataclass
class _Picture:
    lines: list[str]
    panels: list[_Panel]


def _grid_dims(parts: tuple[int, ...]) -> tuple[int | None, int | None]:
    """(row dim, column dim) of the grid: the last two split dims, topped up with the last dims."""
    split = [d for d, n in enumerate(parts) if n > 1]
    chosen = split[-2:]
    for d in reversed(range(len(parts))):
        if len(chosen) >= min(2, len(parts)):
            break
        if d not in chosen:
            chosen.append(d)
    chosen.sort()
    return (None,) * (2 - len(chosen)) + tuple(chosen)


def _panels(parts, labels, corner_name, title, cell) -> list[_Panel]:
    """Lay the blocks ``itertools.product(*map(range, parts))`` out as panels.

    ``labels[d][i]`` names position ``i`` of dim ``d``; ``title(fixed)`` names the panel where the
    non-grid dims sit at ``fixed`` (dim -> position); ``cell(position tuple)`` is (text, colour).
    """
    row, col = _grid_dims(parts)
    others = [d for d in range(len(parts)) if d not in (row, col)]
    panel_positions = list(itertools.product(*(range(parts[d]) for d in others)))
    out = []
    for fixed_pos in panel_positions:
        fixed = dict(zip(others, fixed_pos))

        def at(r, c):
            pos = dict(fixed)
            if row is not None:
                pos[row] = r
            if col is not None:
                pos[col] = c
            return tuple(pos[d] for d in range(len(parts)))

        rows = range(parts[row]) if row is not None else [0]
        cols = range(parts[col]) if col is not None else [0]
        out.append(_Panel(
            title=title(fixed) if len(panel_positions) > 1 else None,
            corner=corner_name(row, col),
            col_labels=[labels[col][c] for c in cols] if col is not None else None,
            row_labels=[labels[row][r] for r in rows] if row is not None else None,
            cells=[[cell(at(r, c)) for c in cols] for r in rows]))
    return out


# -- the picture of a sharding -----------------------------------------------------------------

def _sharding_and_shape(x, shape):
    if isinstance(x, NamedSharding):
        return x, (None if shape is None else _check_shape(shape)), None
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and hasattr(x, "shape"):
        if shape is not None and _check_shape(shape) != tuple(x.shape):
            raise ShardingError(f"visualize_sharding: shape={tuple(shape)} was given for an array of "
                                f"shape {tuple(x.shape)}; leave shape out for arrays.")
        return sharding, tuple(x.shape), getattr(x, "dtype", None)
    raise TypeError(f"visualize_sharding expects an spmd.Array or a NamedSharding, got "
                    f"{type(x).__name__} {x!r}.")


def _check_shape(shape) -> tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:
        raise ShardingError(f"visualize_sharding: shape {shape!r} is not a tuple of sizes.") from None
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0:
            raise ShardingError(f"visualize_sharding: size {d!r} in shape {dims} is not a "
                                f"non-negative integer.")
    return tuple(int(d) for d in dims)


def _device_labels(mesh: AbstractMesh) -> tuple[str, np.ndarray]:
    """A label prefix ("CPU") and an id per mesh position; an AbstractMesh numbers positions."""
    if isinstance(mesh, Mesh):
        platforms = {d.platform for d in mesh.devices.flat}
        return "/".join(sorted(p.upper() for p in platforms)), mesh.device_ids
    return "pos", np.arange(mesh.size).reshape(mesh.axis_sizes)


def _mesh_text(mesh: AbstractMesh) -> str:
    return "{" + ", ".join(f"{n!r}: {s}" for n, s in zip(mesh.axis_names, mesh.axis_sizes)) + "}"


def _sharding_picture(x, shape) -> _Picture:
    sharding, shape, dtype = _sharding_and_shape(x, shape)
    mesh = sharding.mesh
    symbolic = shape is None  # a sharding without a shape: draw one cell per block
    ndim = len(sharding.spec) if symbolic else len(shape)
    dim_axes = sharding._dim_axes(ndim)
    parts = sharding.num_parts(ndim)
    if symbolic:
        shape = parts
    ranges = [[shard_range(d, n, i) for i in range(n)] for d, n in zip(shape, parts)]

    prefix, ids = _device_labels(mesh)
    holders: dict[tuple[int, ...], list[int]] = {}
    for mesh_index in np.ndindex(*mesh.axis_sizes):
        coords = dict(zip(mesh.axis_names, mesh_index))
        pos = tuple(sharding._dim_position(coords, axes) for axes in dim_axes)
        holders.setdefault(pos, []).append(int(ids[mesh_index]))

    def cell(pos):
        text = f"{prefix} " + ",".join(str(i) for i in sorted(holders[pos]))
        if not symbolic and any(ranges[d][i][0] == ranges[d][i][1] for d, i in enumerate(pos)):
            return text + " (empty)", _EMPTY
        return text, int(np.ravel_multi_index(pos, parts)) if parts else 0

    if symbolic:
        labels = [[f"#{i}" for i in range(n)] for n in parts]
    else:
        labels = [[f"{a}:{b}" for a, b in rs] for rs in ranges]

    def corner(row, col):
        return f"dim {row} \\ {col}" if row is not None else ""

    def title(fixed):
        return "x[" + ", ".join(labels[d][fixed[d]] if d in fixed and parts[d] > 1 else ":"
                                for d in range(ndim)) + "]"

    dtype_name = "" if dtype is None else str(np.dtype(dtype))
    what = (f"any array of rank {ndim}" if symbolic
            else f"{dtype_name}[{','.join(map(str, shape))}]" if dtype_name else f"shape {shape}")
    lines = [f"{what} as {sharding.spec} on mesh {_mesh_text(mesh)}"]
    copies = mesh.size // math.prod(parts) if parts else mesh.size
    blocks = f"{math.prod(parts)} block{'s' * (math.prod(parts) != 1)}"
    if not symbolic:
        blocks += f" of shape {sharding.shard_shape(shape)}"
    held = "1 device" if copies == 1 else f"{copies} devices"
    replicated = [a for a in sharding.replica_axes() if mesh.axis_size(a) > 1]
    lines.append(f"{blocks}, each on {held}"
                 + (f" (replicated over {', '.join(map(repr, replicated))})" if replicated else ""))
    if not symbolic:
        for d, (size, n) in enumerate(zip(shape, parts)):
            if size % n:
                empty = sum(a == b for a, b in ranges[d])
                lines.append(f"uneven: dim {d} of size {size} in {n} blocks of at most "
                             f"{block_size(size, n)}" + (f"; {empty} empty" if empty else ""))
    return _Picture(lines, _panels(parts, labels, corner, title, cell))


def _mesh_picture(mesh: AbstractMesh) -> _Picture:
    prefix, ids = _device_labels(mesh)
    names = mesh.axis_names
    labels = [[str(i) for i in range(n)] for n in mesh.axis_sizes]

    def corner(row, col):
        return f"{names[row]} \\ {names[col]}" if row is not None else ""

    def title(fixed):
        return ", ".join(f"{names[d]}={i}" for d, i in sorted(fixed.items()))

    def cell(pos):
        return f"{prefix} {int(ids[pos])}", int(np.ravel_multi_index(pos, mesh.axis_sizes))

    platform = prefix.lower() if isinstance(mesh, Mesh) else "abstract"
    lines = [f"Mesh {_mesh_text(mesh)}: {mesh.size} {platform} devices"]
    panels = _panels(mesh.axis_sizes, labels, corner, title, cell)
    for p in panels:  # a 1-D mesh still names its axis
        if p.row_labels is None and p.col_labels is not None:
            p.corner, p.row_labels = names[0], [""]
    return _Picture(lines, panels)


# -- rendering -----------------------------------------------------------------------------------

def _colours(index: int) -> tuple[str, str]:
    """(text, background) colours of block ``index``; empty blocks are grey."""
    bg = "#e0e0e0" if index == _EMPTY else _PALETTE[index % len(_PALETTE)]
    r, g, b = (int(bg[i:i + 2], 16) for i in (1, 3, 5))
    return ("#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 150 else "#ffffff"), bg


def _rich(picture: _Picture):

    parts = [Text(line) for line in picture.lines]
    for panel in picture.panels:
        table = Table(title=panel.title, show_header=panel.col_labels is not None, show_lines=True,
                      box=box.SQUARE, padding=0, header_style="bold")
        if panel.row_labels is not None:
            table.add_column(f" {panel.corner} ", justify="center", style="bold")
        for label in panel.col_labels or [""]:
            table.add_column(f" {label} ", justify="center")
        for r, row in enumerate(panel.cells):
            cells = [Padding(Text(text, justify="center"), (0, 1), style="{} on {}".format(*_colours(c)),
                             expand=True) for text, c in row]
            head = [f" {panel.row_labels[r]} "] if panel.row_labels is not None else []
            table.add_row(*head, *cells)
        parts.append(table)
    return Group(*parts)


def _to_html(picture: _Picture) -> str:
    e = html.escape
    cell_style = "padding:4px 10px;border:1px solid #fff;text-align:center;white-space:nowrap"
    head_style = "padding:2px 8px;text-align:center;font-weight:bold;white-space:nowrap"
    out = ['<div class="spmd-layout" style="font-family:monospace;font-size:13px">']
    out += [f"<div>{e(line)}</div>" for line in picture.lines]
    for panel in picture.panels:
        out.append('<table style="border-collapse:collapse;margin:6px 0">')
        if panel.title:
            out.append(f'<caption style="text-align:left;font-weight:bold">{e(panel.title)}</caption>')
        if panel.col_labels is not None:
            corner = f'<th style="{head_style}">{e(panel.corner)}</th>' if panel.row_labels is not None else ""
            out.append("<tr>" + corner + "".join(f'<th style="{head_style}">{e(c)}</th>'
                                                 for c in panel.col_labels) + "</tr>")
        for r, row in enumerate(panel.cells):
            head = (f'<th style="{head_style}">{e(panel.row_labels[r])}</th>'
                    if panel.row_labels is not None else "")
            tds = "".join('<td style="{};color:{};background:{}">{}</td>'.format(
                cell_style, *_colours(c), e(text)) for text, c in row)
            out.append(f"<tr>{head}{tds}</tr>")
        out.append("</table>")
    out.append("</div>")
    return "\n".join(out)


def _plain(picture: _Picture, width: int) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False, force_jupyter=False,
            legacy_windows=False).print(_rich(picture))
    return buf.getvalue()


# -- public --------------------------------------------------------------------------------------

def visualize_sharding(x, shape=None, *, _html: bool = False):
    """Draw which devices hold which block of ``x`` (an ``Array``, or a ``NamedSharding`` with an
    optional global ``shape``).  Prints coloured tables in a terminal, HTML in a notebook.

    >>> import numpy as np, spmd
    >>> mesh = spmd.make_mesh((2, 4), ("data", "model"))
    >>> spmd.visualize_sharding(spmd.NamedSharding(mesh, spmd.P("data", "model")), (8, 4))  # doctest: +SKIP
    """
    picture = _sharding_picture(x, shape)
    if _html:
        return _to_html(picture)
    _show(picture)


def _show(picture: _Picture) -> None:
    console = Console()
    if console.is_jupyter:
        from IPython.display import HTML, display  # optional: only inside a Jupyter kernel
        display(HTML(_to_html(picture)))
    else:
        console.print(_rich(picture))


def sharding_text(x, shape=None, *, width: int = 200) -> str:
    """The picture of :func:`visualize_sharding` as plain text (no colour codes)."""
    return _plain(_sharding_picture(x, shape), width)


def mesh_html(mesh: AbstractMesh) -> str:
    """The devices of ``mesh`` laid out on its axes, as HTML (``Mesh._repr_html_``)."""
    return _to_html(_mesh_picture(mesh))


def mesh_text(mesh: AbstractMesh, *, width: int = 200) -> str:
    """The devices of ``mesh`` laid out on its axes, as plain text."""
    return _plain(_mesh_picture(mesh), width)


_sharding_module._pictures["html"] = lambda s: visualize_sharding(s, _html=True)
_mesh_module._html_renderer = mesh_html
