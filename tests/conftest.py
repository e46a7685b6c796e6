"""Shared test setup.  JAX (the oracle in some tests) sees 8 CPU devices, like spmd's default.

Also the hypothesis strategies for random layouts (``from conftest import layouts``).
"""
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The repository root, so that tests can import `benchmarks` however pytest was started.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import math  # noqa: E402

import hypothesis.strategies as st  # noqa: E402

import spmd  # noqa: E402


@st.composite
def meshes(draw, max_axes=3, max_devices=8):
    """A mesh of 1..max_axes axes over a random subset and order of the devices."""
    sizes: list[int] = []
    for _ in range(draw(st.integers(1, max_axes))):
        sizes.append(draw(st.integers(1, max_devices // math.prod(sizes))))
    names = draw(st.permutations(["x", "y", "z"]))[:len(sizes)]
    ids = draw(st.permutations(range(spmd.device_count())))[:math.prod(sizes)]
    devs = spmd.devices()
    return spmd.make_mesh(tuple(sizes), tuple(names), devices=[devs[i] for i in ids])


@st.composite
def specs(draw, mesh, rank):
    """A PartitionSpec for rank ``rank``: each mesh axis splits one dim (in random order) or none,
    single axes spelled as ``'x'`` or ``('x',)``, unsplit dims as ``None`` or ``()``."""
    dims: list[list[str]] = [[] for _ in range(rank)]
    for name in draw(st.permutations(mesh.axis_names)):
        d = draw(st.integers(-1, rank - 1))
        if d >= 0:
            dims[d].append(name)
    used = max((d + 1 for d, axes in enumerate(dims) if axes), default=0)

    def entry(axes):
        if not axes:
            return draw(st.sampled_from([None, ()]))
        return draw(st.sampled_from([axes[0], tuple(axes)])) if len(axes) == 1 else tuple(axes)
    return spmd.P(*(entry(axes) for axes in dims[:draw(st.integers(used, rank))]))


@st.composite
def layouts(draw, even=None, max_rank=4):
    """(NamedSharding, shape): with ``even`` every dim divides evenly; otherwise dims may not."""
    mesh = draw(meshes())
    rank = draw(st.integers(0, max_rank))
    sharding = spmd.NamedSharding(mesh, draw(specs(mesh, rank)))
    parts = sharding.num_parts(rank)
    if even is None:
        even = draw(st.booleans())
    if even:
        shape = tuple(n * draw(st.integers(0, 3)) for n in parts)
    else:
        shape = tuple(draw(st.integers(0, 2 * n + 1)) for n in parts)
    return sharding, shape
