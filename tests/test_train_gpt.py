"""``examples/train_gpt.py``: 20 steps of every variant, and on 4 processes, give the losses of
the model trained by JAX on one device; its backward program psums the parameters' bytes over
``data``, no more.

The example's functions take the framework as arguments, so the JAX oracle is the same code
called with ``jax`` and ``jax.numpy``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import spmd

from _mp import needs_mpi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "train_gpt.py")
STEPS = 20


def _load():
    spec = importlib.util.spec_from_file_location("train_gpt", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


G = _load()


@pytest.fixture(scope="module")
def reference():
    """The losses of the same model trained by JAX on one device."""
    import jax
    import jax.numpy as jnp
    return G.train(jax, jnp, "dp", compiler=True, steps=STEPS, n_devices=1)


@pytest.mark.parametrize("parallel,compiler", [("dp_tp", False), ("dp", False), ("tp", False),
                                               ("dp_tp", True)])
def test_every_variant_gives_the_losses_of_one_device(parallel, compiler, reference):
    losses = G.train(spmd, np, parallel, compiler, steps=STEPS)
    np.testing.assert_allclose(losses, reference, rtol=0, atol=1e-5)
    assert losses[-1] < losses[0] - 1                       # it learns


def test_backward_psums_exactly_the_parameter_bytes_over_data():
    """Each gradient is summed over ``data`` once, at the size of this device's block of its
    parameter (a quarter of the column- and row-parallel weights); nothing the size of an
    activation crosses ``data``."""
    mesh = G.mesh_for(spmd, "dp_tp", 8)
    loss, specs, _ = G.make_loss(spmd, np, mesh)
    params, (x, y) = G.init_params(), next(G.batches())
    program = spmd.make_program(spmd.value_and_grad(loss))(params, x, y)
    over_data = [c for c in spmd.collectives_of(program)
                 if "transpose" in c.where and c.axes == ("data",)]
    assert {c.op for c in over_data} == {"psum"}
    leaves = spmd.tree_util.tree_leaves(specs, is_leaf=lambda s: isinstance(s, spmd.P))
    local = [p.nbytes // (4 if "model" in str(s) else 1)
             for p, s in zip(spmd.tree_util.tree_leaves(params), leaves)]
    assert sorted(c.bytes_per_device for c in over_data) == sorted(local)


def test_compiler_reduces_each_gradient_over_data_once():
    """With ``spmd.jit`` shardings, Adam reads each pending gradient three times
    (``0.1 * g``, ``0.01 * g * g``); the compiler reduces it once, not once per read."""
    mesh = G.mesh_for(spmd, "dp_tp", 8)
    step, _ = G.make_step(spmd, np, mesh, compiler=True)
    params, (x, y) = G.init_params(), next(G.batches())
    zeros = spmd.tree_util.tree_map(np.zeros_like, params)
    lowered = step.lower(params, dict(m=zeros, v=zeros), x, y, np.float32(1), np.float32(1))
    reduced = sorted(c.shape for c in spmd.collectives_of(lowered.per_device_program)
                     if c.op == "psum" and c.axes == ("data",) and len(c.shape) == 2)
    specs = spmd.tree_util.tree_leaves(G.param_specs(spmd.P, "model"),
                                       is_leaf=lambda s: isinstance(s, spmd.P))
    blocks = [spmd.NamedSharding(mesh, s).shard_shape(p.shape)
              for p, s in zip(spmd.tree_util.tree_leaves(params), specs) if p.ndim == 2]
    assert len(reduced) >= len(blocks) - 2 and set(reduced) <= set(blocks)
    assert all(reduced.count(b) <= blocks.count(b) for b in set(reduced))


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
@needs_mpi
def test_example_runs_unchanged_on_4_processes(tmp_path, reference):
    """``spmd-run -n 4 examples/train_gpt.py``: a 2x2 mesh across 4 MPI processes gives the
    losses of one device (``float(loss)`` of a ``P()`` scalar works on every process)."""
    pytest.importorskip("mpi4py")
    out = tmp_path / "losses.json"
    steps = 6 if os.environ.get("CI") == "true" else STEPS   # 4 processes on 2 cores: fewer in CI
    p = subprocess.run([sys.executable, "-m", "spmd.run", "-n", "4", EXAMPLE, "--steps",
                        str(steps), "--plot", str(tmp_path / "loss.png"), "--out", str(out)],
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
                       text=True, timeout=110)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "mesh {'data': 2, 'model': 2} (4 process(es))" in p.stdout
    np.testing.assert_allclose(json.loads(out.read_text()), reference[:steps], rtol=0, atol=1e-5)
