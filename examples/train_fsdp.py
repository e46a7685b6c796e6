"""Train an MLP with FSDP on 8 simulated devices and check it against one device.

The parameters and the Adam state live split over the ``data`` axis (1/8 per device). The loss
and gradients are a ``shard_map`` whose collectives are written out (``spmd.parallel.fsdp``:
an ``all_gather`` per parameter before use, a ``psum_scatter`` per gradient); the optimizer
(global-norm clipping, AdamW, warm-up and cosine decay) runs on the global sharded arrays in the
same ``jit``, where the compiler adds the one small all-reduce the norm needs.

    python examples/train_fsdp.py
"""
import numpy as np

import spmd
import spmd.optim as optim
from spmd import P, NamedSharding
from spmd.parallel import fsdp

LAYERS, D, BATCH, STEPS = 4, 32, 64, 20


def layer(p, h):
    return np.tanh(h @ p["w"] + p["b"])


def loss_fn(params, x, y):                       # the unsharded model
    for p in params:
        x = layer(p, x)
    return np.mean((x - y) ** 2)


def init(seed=0):
    rng = np.random.default_rng(seed)
    return [{"w": (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32),
             "b": np.zeros(D, np.float32)} for _ in range(LAYERS)]


def main():
    mesh = spmd.make_mesh((8,), ("data",))
    rng = np.random.default_rng(1)
    x, y = (rng.standard_normal((BATCH, D)).astype(np.float32) for _ in range(2))
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(
        optim.warmup_cosine_decay_schedule(0.0, 3e-2, warmup_steps=5, decay_steps=STEPS)))

    @spmd.shard_map(mesh=mesh, in_specs=(P("data"), P("data"), P("data")),
                    out_specs=(P(), P("data")))
    def loss_and_grads(shards, x, y):
        def local(shards):
            out = fsdp.fsdp_apply(layer, shards, x, "data")
            return spmd.pmean(np.mean((out - y) ** 2), "data")
        return spmd.value_and_grad(local)(shards)

    def fsdp_step(params, state, x, y):
        loss, grads = loss_and_grads(params, x, y)
        updates, state = tx.update(grads, state, params)
        return loss, optim.apply_updates(params, updates), state

    @spmd.jit
    def reference_step(params, state):
        loss, grads = spmd.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return loss, optim.apply_updates(params, updates), state

    split = NamedSharding(mesh, P("data"))
    params = spmd.tree_util.tree_map(lambda a: spmd.device_put(a, split), init())
    state = tx.init(params)
    # parameters and state stay split: arrays over "data", scalars (step counts) replicated
    like = lambda tree: spmd.tree_util.tree_map(
        lambda a: NamedSharding(mesh, P("data") if len(a.shape) else P()), tree)
    fsdp_step = spmd.jit(fsdp_step, out_shardings=(NamedSharding(mesh, P()), like(params),
                                                   like(state)))
    xs, ys = spmd.device_put(x, split), spmd.device_put(y, split)
    spmd.print_collectives(spmd.make_program(loss_and_grads)(params, xs, ys))
    reference, reference_state = init(), tx.init(init())
    for step in range(STEPS):
        loss, params, state = fsdp_step(params, state, xs, ys)
        expected, reference, reference_state = reference_step(reference, reference_state)
        print(f"step {step:2d}  loss {float(np.asarray(loss)):.6f}  "
              f"(one device: {float(np.asarray(expected)):.6f})")
    gap = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
              zip(spmd.tree_util.tree_leaves(params), spmd.tree_util.tree_leaves(reference)))
    w = params[0]["w"]
    print(f"largest parameter difference from one device: {gap:.2e}; "
          f"each device holds {w.sharding.shard_shape(w.shape)} of w {w.shape}")
    return gap


if __name__ == "__main__":
    main()
