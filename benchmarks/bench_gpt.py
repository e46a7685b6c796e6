"""One training step of the GPT of ``examples/train_gpt.py``: spmd vs JAX, the same code.

2 layers, d_model 128, 4 heads, sequence 64, vocabulary 256, batch 16, FFN 512, Adam by hand,
on a 2x4 mesh (data x model).  Two variants, each the same function run by both frameworks:
``shard_map`` (Megatron tensor parallel, explicit psums; ``jax.shard_map`` on JAX's side) and
``jit shardings`` (global code, ``jit`` with ``in_shardings``/``out_shardings``; JAX's jit with
``NamedSharding``s).  The time is one step (forward, backward, Adam) after the first; the
first call's time (trace + compile + run) is reported beside it.
"""
from __future__ import annotations

import importlib.util
import os
import time

import numpy as np

import spmd
from ._harness import Row, benchmark, jax_peer, skip_rows, timeit, timeit_pair

NAME = "gpt"
_EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                        "train_gpt.py")


def _model():
    """The example as a module (``examples/`` is not a package)."""
    spec = importlib.util.spec_from_file_location("_train_gpt", _EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _setup(G, jax, jnp, compiler, parallel="dp_tp", n_devices=8):
    """The jitted step and its arguments on the mesh, for ``jax`` (spmd or JAX)."""
    mesh = G.mesh_for(jax, parallel, n_devices)
    step, (param_sh, batch_sh) = G.make_step(jax, jnp, mesh, compiler)
    params = G.init_params()
    zeros = jax.tree_util.tree_map(np.zeros_like, params)
    x, y = next(G.batches())
    args = (jax.device_put(params, param_sh),
            dict(m=jax.device_put(zeros, param_sh), v=jax.device_put(zeros, param_sh)),
            jax.device_put(x, batch_sh), jax.device_put(y, batch_sh), np.float32(10.0),
            np.float32(100.0))
    return step, args


def _first(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# --quick: the same program at toy sizes (JAX's compile of the full model alone takes seconds)
_QUICK_SIZES = dict(LAYERS=1, D_MODEL=32, HEADS=4, HEAD_DIM=8, SEQ=16, BATCH=4, FFN=64)


@benchmark(NAME)
def gpt_step(quick: bool) -> list[Row]:
    G = _model()
    if quick:
        vars(G).update(_QUICK_SIZES)
    timing = dict(repeat=3, min_time=0.0) if quick else dict(repeat=9, min_time=0.5)
    jax, why = jax_peer(8)
    rows = []
    for compiler in (False, True):
        case = (f"one step, {'jit shardings' if compiler else 'shard_map'}, 2x4 mesh, "
                f"{G.LAYERS} layers d{G.D_MODEL} seq {G.SEQ} batch {G.BATCH}")
        step, args = _setup(G, spmd, np, compiler)
        ours, first = _first(lambda: step(*args))
        if why:
            rows.append(Row(NAME, case, timeit(lambda: step(*args), **timing), "jax", None,
                            {"skipped": why}))
            continue
        import jax.numpy as jnp
        jstep, jargs = _setup(G, jax, jnp, compiler)
        theirs, jfirst = _first(lambda: jax.block_until_ready(jstep(*jargs)))
        np.testing.assert_allclose(float(ours[2]), float(theirs[2]), rtol=1e-5)
        spmd_s, jax_s = timeit_pair(lambda: step(*args),
                                    lambda: jax.block_until_ready(jstep(*jargs)), **timing)
        rows.append(Row(NAME, case, spmd_s, "jax", jax_s,
                        {"first step": f"{first:.2f}s vs {jfirst:.2f}s ({first / jfirst:.2f}x)"}))
    return rows


@benchmark("gpt_gpu", gpu=True)
def gpt_step_on_gpu(quick: bool) -> list[Row]:
    """The same step with ``SPMD_EXECUTOR=gpu`` (the 2x4 mesh as virtual devices on GPU 0)
    against JAX's step on that GPU (one device: the same model unsharded, jitted by XLA)."""
    import spmd.gpu as gpu
    ok, why = gpu.available()
    case = "one step, shard_map, 2x4 mesh on GPU 0 vs JAX on GPU 0 (one device)"
    if not ok:
        return skip_rows("gpt_gpu", case, "jax", f"no usable GPU: {why}")
    G = _model()
    if quick:
        vars(G).update(_QUICK_SIZES)
    timing = dict(repeat=3, min_time=0.0) if quick else dict(repeat=9, min_time=0.5)
    saved = os.environ.get("SPMD_EXECUTOR")
    os.environ["SPMD_EXECUTOR"] = "gpu"
    try:
        step, args = _setup(G, spmd, np, False)
        ours, first = _first(lambda: step(*args))
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # leave CuPy memory
        try:
            import jax
            import jax.numpy as jnp
            on_gpu = jax.devices()[0].platform == "gpu"
        except Exception as e:              # no jax, or no GPU backend in it
            on_gpu, why = False, f"no JAX GPU backend ({type(e).__name__})"
        if not on_gpu:
            return [Row("gpt_gpu", case, timeit(lambda: step(*args), **timing), "jax", None,
                        {"skipped": why or "JAX runs on the CPU here (run with JAX_PLATFORMS=)"})]
        jstep, jargs = _setup(G, jax, jnp, False, parallel="dp", n_devices=1)
        theirs, jfirst = _first(lambda: jax.block_until_ready(jstep(*jargs)))
        np.testing.assert_allclose(float(ours[2]), float(theirs[2]), rtol=1e-4)
        spmd_s, jax_s = timeit_pair(lambda: step(*args),
                                    lambda: jax.block_until_ready(jstep(*jargs)), **timing)
    finally:
        if saved is None:
            os.environ.pop("SPMD_EXECUTOR", None)
        else:
            os.environ["SPMD_EXECUTOR"] = saved
    return [Row("gpt_gpu", case, spmd_s, "jax", jax_s,
                {"first step": f"{first:.2f}s vs {jfirst:.2f}s"})]
