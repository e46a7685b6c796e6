"""Train a data-parallel MLP with checkpoints, and resume after the job is killed.

    spmd-run -n 2 --max-restarts 1 examples/checkpoint_resume.py --checkpoint-dir /tmp/ck
    python examples/checkpoint_resume.py --checkpoint-dir /tmp/ck      # 2 simulated devices

Every ``--every`` steps the parameters, the Adam state and the step are saved in the
background (``spmd.io.CheckpointManager``: training goes on while the files are written).  A
restarted job restores the latest committed step and carries on from there, so its losses are
those of a run that was never interrupted.  To try it, ``SPMD_IO_KILL_AT_STEP=5`` (before
``spmd-run``) makes the last rank kill itself with SIGKILL when step 5 would be saved, once.
"""
import argparse
import tempfile
import json
import os

import numpy as np

import spmd
import spmd.optim as optim
from spmd import P, NamedSharding

D, HIDDEN, BATCH = 16, 32, 32


def init_params(seed=0):
    rng = np.random.default_rng(seed)
    return {"w1": (rng.standard_normal((D, HIDDEN)) / np.sqrt(D)).astype(np.float32),
            "b1": np.zeros(HIDDEN, np.float32),
            "w2": (rng.standard_normal((HIDDEN, 1)) / np.sqrt(HIDDEN)).astype(np.float32)}


def batch(step):
    """The global batch of a step: the same on every process and in every attempt."""
    rng = np.random.default_rng(1000 + step)
    x = rng.standard_normal((BATCH, D)).astype(np.float32)
    return x, np.sin(x.sum(axis=1, keepdims=True)).astype(np.float32)


def loss_fn(params, x, y):
    h = np.tanh(x @ params["w1"] + params["b1"])
    return np.mean((h @ params["w2"] - y) ** 2)


def train(steps, checkpoint_dir, every=2, data_parallel=2):
    """Train ``steps`` steps (resuming from ``checkpoint_dir`` if it holds a checkpoint);
    returns ``{step: loss}`` of the steps this call ran."""
    mesh = spmd.make_mesh((data_parallel,), ("data",))
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    tx = optim.adam(1e-2)

    @spmd.jit
    @spmd.shard_map(mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P(), P()))
    def step_fn(params, state, x, y):
        global_loss = lambda params: spmd.pmean(loss_fn(params, x, y), "data")
        loss, grads = spmd.value_and_grad(global_loss)(params)
        updates, state = tx.update(grads, state, params)
        return loss, optim.apply_updates(params, updates), state

    params = spmd.device_put(init_params(), replicated)
    tree = {"params": params, "opt": spmd.device_put(tx.init(params), replicated), "step": 0}
    manager = spmd.io.CheckpointManager(checkpoint_dir, max_to_keep=2, save_interval_steps=every)
    start = manager.latest_step()
    if start is not None:                      # the Arrays of the fresh tree give the layouts
        tree = manager.restore(start, tree)
        print(f"resumed from step {start}", flush=True)
    losses = {}
    for step in range(tree["step"], steps):
        x, y = (spmd.device_put(a, split) for a in batch(step))
        loss, params, state = step_fn(tree["params"], tree["opt"], x, y)
        tree = {"params": params, "opt": state, "step": step + 1}
        losses[step] = float(loss)
        manager.save(step + 1, tree)
    manager.wait_until_finished()
    return losses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint-dir",
                        help="where the checkpoints go (default: a temporary folder)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=2, help="save every this many steps")
    parser.add_argument("--out", help="write the losses of the steps run to this JSON file")
    args = parser.parse_args(argv)
    n = 2
    if "SPMD_PROCESS_ID" in os.environ:
        spmd.distributed.initialize()
        n = spmd.process_count()
    if spmd.process_count() > 1 and not args.checkpoint_dir:
        parser.error("--checkpoint-dir: every process must write into one shared folder")
    with tempfile.TemporaryDirectory() as scratch:
        losses = train(args.steps, args.checkpoint_dir or scratch, args.every, n)
    if spmd.process_index() == 0:
        for step, loss in losses.items():
            print(f"step {step:3d}  loss {loss:.6f}", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(list(losses.values()), f)


if __name__ == "__main__":
    main()
