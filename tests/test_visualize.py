"""visualize_sharding: which devices hold which block, for ranks 0..4, replication and uneven dims."""
import numpy as np
import pytest

import spmd
from spmd import P, NamedSharding
from spmd.visualize import sharding_text, mesh_text, mesh_html


def rows(text: str) -> list[list[str]]:
    """The cells of every table row in a plain-text picture (header rows included)."""
    return [[c.strip() for c in line.strip().strip("│").split("│")]
            for line in text.splitlines() if line.strip().startswith("│")]


def panels(text: str) -> dict[str, list[list[str]]]:
    """Rows grouped under the panel titles (lines like ``x[0:2, :, :]``)."""
    out, title = {}, None
    for line in text.splitlines():
        if line.strip().startswith("x["):
            title = line.strip()
        elif line.strip().startswith("│"):
            out.setdefault(title, []).extend(rows(line))
    return out


@pytest.fixture
def mesh():
    return spmd.make_mesh((2, 4), ("data", "model"))


def test_1d(mesh):
    x = spmd.device_put(np.arange(8.0), NamedSharding(mesh, P(("data", "model"))))
    text = sharding_text(x)
    assert text.splitlines()[:2] == ["float64[8] as P(('data', 'model')) on mesh {'data': 2, 'model': 4}",
                                     "8 blocks of shape (1,), each on 1 device"]
    assert rows(text) == [[f"{i}:{i + 1}" for i in range(8)], [f"CPU {i}" for i in range(8)]]


def test_2d_grid_like_jax(mesh):
    x = spmd.device_put(np.zeros((8, 4), np.float32), NamedSharding(mesh, P("data", "model")))
    assert rows(sharding_text(x)) == [
        ["dim 0 \\ 1", "0:1", "1:2", "2:3", "3:4"],
        ["0:4", "CPU 0", "CPU 1", "CPU 2", "CPU 3"],
        ["4:8", "CPU 4", "CPU 5", "CPU 6", "CPU 7"]]


def test_replication_lists_every_holder(mesh):
    text = sharding_text(NamedSharding(mesh, P(None, "data")), (4, 6))
    assert "2 blocks of shape (4, 3), each on 4 devices (replicated over 'model')" in text
    assert rows(text) == [["dim 0 \\ 1", "0:3", "3:6"], ["0:4", "CPU 0,1,2,3", "CPU 4,5,6,7"]]
    scalar = sharding_text(spmd.device_put(np.float32(1), NamedSharding(mesh, P())))
    assert "replicated over 'data', 'model'" in scalar
    assert rows(scalar) == [["CPU 0,1,2,3,4,5,6,7"]]


def test_3d_one_panel_per_block_of_leading_dims():
    mesh = spmd.make_mesh((2, 2, 2), ("a", "b", "c"))
    x = spmd.device_put(np.zeros((4, 6, 2)), NamedSharding(mesh, P("a", "c", "b")))
    text = sharding_text(x)
    assert panels(text) == {
        "x[0:2, :, :]": [["dim 1 \\ 2", "0:1", "1:2"], ["0:3", "CPU 0", "CPU 2"], ["3:6", "CPU 1", "CPU 3"]],
        "x[2:4, :, :]": [["dim 1 \\ 2", "0:1", "1:2"], ["0:3", "CPU 4", "CPU 6"], ["3:6", "CPU 5", "CPU 7"]]}


def test_4d_with_replication_and_unsplit_dims():
    mesh = spmd.make_mesh((2, 4), ("data", "model"))
    text = sharding_text(NamedSharding(mesh, P("data", None, None, "model")), (2, 3, 5, 8))
    assert "8 blocks of shape (1, 3, 5, 2), each on 1 device" in text
    assert rows(text)[:2] == [["dim 0 \\ 3", "0:2", "2:4", "4:6", "6:8"], ["0:1", "CPU 0", "CPU 1", "CPU 2", "CPU 3"]]
    assert "x[" not in text  # one panel: no titles needed
    text = sharding_text(NamedSharding(mesh, P(None, "model", "data")), (1, 4, 2, 3))
    assert list(panels(text)) == [None]
    assert rows(text)[1] == ["0:1", "CPU 0", "CPU 4"]


def test_uneven_and_empty_blocks(mesh):
    text = sharding_text(spmd.device_put(np.arange(6), NamedSharding(mesh, P("model"))))
    assert "uneven: dim 0 of size 6 in 4 blocks of at most 2; 1 empty" in text
    assert rows(text) == [["0:2", "2:4", "4:6", "6:6"], ["CPU 0,4", "CPU 1,5", "CPU 2,6", "CPU 3,7 (empty)"]]
    html = spmd.visualize_sharding(NamedSharding(mesh, P("model")), (6,), _html=True)
    assert html.count("background:#e0e0e0") == 1  # the empty block is grey
    text = sharding_text(NamedSharding(mesh, P("data", "model")), (3, 5))
    assert rows(text) == [["dim 0 \\ 1", "0:2", "2:4", "4:5", "5:5"],
                          ["0:2", "CPU 0", "CPU 1", "CPU 2", "CPU 3 (empty)"],
                          ["2:3", "CPU 4", "CPU 5", "CPU 6", "CPU 7 (empty)"]]


def test_sharding_without_shape_and_abstract_mesh(mesh):
    text = sharding_text(NamedSharding(mesh, P("model")))
    assert text.startswith("any array of rank 1 as P('model')")
    assert rows(text) == [["#0", "#1", "#2", "#3"], ["CPU 0,4", "CPU 1,5", "CPU 2,6", "CPU 3,7"]]
    abstract = sharding_text(NamedSharding(mesh.abstract_mesh, P("data")), (4,))
    assert rows(abstract) == [["0:2", "2:4"], ["pos 0,1,2,3", "pos 4,5,6,7"]]


def test_permuted_devices_are_labelled_by_id():
    mesh = spmd.make_mesh((2, 4), ("data", "model"), devices=spmd.devices()[::-1])
    assert rows(sharding_text(NamedSharding(mesh, P("data")), (2,)))[1] == ["CPU 4,5,6,7", "CPU 0,1,2,3"]


def test_visualize_prints_and_html(mesh, capsys):
    x = spmd.device_put(np.zeros((8, 4)), NamedSharding(mesh, P("data", "model")))
    assert spmd.visualize_sharding(x) is None
    assert "CPU 7" in capsys.readouterr().out
    html = spmd.visualize_sharding(x, _html=True)
    assert html == x._repr_html_() and html.startswith('<div class="spmd-layout"')
    assert html.count("<td") == 8 and "background:#" in html
    assert NamedSharding(mesh, P("data"))._repr_html_().count("<td") == 2


def test_mesh_pictures():
    mesh = spmd.make_mesh((2, 2, 2), ("a", "b", "c"))
    text = mesh_text(mesh)
    assert text.splitlines()[0] == "Mesh {'a': 2, 'b': 2, 'c': 2}: 8 cpu devices"
    assert "a=0" in text and "a=1" in text
    assert rows(text)[:2] == [["b \\ c", "0", "1"], ["0", "CPU 0", "CPU 1"]]
    assert mesh_html(mesh).count("<td") == 8 and "<caption" in mesh_html(mesh)
    line = spmd.make_mesh((8,), ("x",))
    assert rows(mesh_text(line)) == [["x"] + [str(i) for i in range(8)], [""] + [f"CPU {i}" for i in range(8)]]


def test_visualize_bad_input(mesh):
    with pytest.raises(TypeError, match="got ndarray"):
        spmd.visualize_sharding(np.zeros(3))
    x = spmd.device_put(np.zeros(8), NamedSharding(mesh, P("model")))
    with pytest.raises(spmd.ShardingError, match=r"shape=\(4,\)"):
        spmd.visualize_sharding(x, (4,))
    with pytest.raises(spmd.ShardingError, match="-1"):
        sharding_text(NamedSharding(mesh, P("model")), (-1,))
    with pytest.raises(spmd.ShardingError, match="rank 0"):
        sharding_text(NamedSharding(mesh, P("model")), ())
