"""Train a small GPT on a 2x4 mesh: data parallel over ``data``, Megatron tensor parallel over
``model``, Adam written by hand, byte-level, on a text shipped beside it (``data/``).

    python examples/train_gpt.py                          # shard_map, 2x4 mesh (dp_tp)
    python examples/train_gpt.py --parallel dp            # data parallel only, 8 devices
    python examples/train_gpt.py --parallel tp            # tensor parallel only, 4 devices
    python examples/train_gpt.py --compiler               # global code + spmd.jit shardings
    python examples/train_gpt.py --parallel fsdp          # a recipe of spmd.parallel (also
                                                          # zero2, tp_vocab, dp_fsdp_tp_pp)
    python examples/train_gpt.py --steps 2 --profile      # where one step's time goes
    spmd-run -n 4 examples/train_gpt.py                   # 4 processes (a 2x2 mesh)
    spmd-run -n 4 --max-restarts 1 examples/train_gpt.py --checkpoint-dir /tmp/gpt   # resumable

The model is 2 layers, d_model 128, 4 heads, sequence 64, vocabulary 256 (bytes), batch 16,
FFN 512.  Every function below takes the framework as arguments (``jax`` and ``jnp``): called
with ``spmd`` and ``numpy`` it trains with spmd; called with ``jax`` and ``jax.numpy`` the same
code trains with JAX, step for step to float32 rounding (``tests/test_train_gpt.py`` checks).

With ``shard_map`` the body sees per-device blocks: each device holds ``4 / model`` heads
(``wq``, ``wk``, ``wv``, ``w1`` split by columns, ``wo`` and ``w2`` by rows), one ``psum`` over
``model`` closes the attention and the MLP, and the loss is a ``pmean`` over ``data``.  With
``--compiler`` the loss is written on global arrays and ``spmd.jit`` is given the same layouts as
``in_shardings``: the sharding compiler inserts the collectives itself.

With ``--checkpoint-dir D`` the parameters, the Adam state, the step and the position in the
data are saved every ``--checkpoint-every`` steps (in the background, ``spmd.io``), and a job
that finds a checkpoint in ``D`` resumes from the latest one: restarted after a crash, it gives
the losses of a run that never stopped, bit for bit.  ``SPMD_IO_KILL_AT_STEP=k`` kills a rank
at step ``k`` to try it.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time

import numpy as np

import spmd

try:       # optional (the `examples` extra): progress bar
    from tqdm import tqdm
except ImportError:
    tqdm = None

LAYERS, D_MODEL, HEADS, SEQ, VOCAB, BATCH, FFN = 2, 128, 4, 64, 256, 16, 512
# the training text: a frozen copy of an earlier version of this script (Python source as
# bytes), kept apart so that editing the script does not change the data
TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "gpt_source.txt")
HEAD_DIM = D_MODEL // HEADS
LR, BETA1, BETA2, EPS = 1e-3, 0.9, 0.99, 1e-8


# ---------------------------------------------------------------------------------------------
# the model, on global arrays or on per-device blocks
# ---------------------------------------------------------------------------------------------

def init_params(seed: int = 0) -> dict:
    """Float32 parameters: normal(0, 0.02) weights, unit gains, zero biases."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: (0.02 * rng.standard_normal(shape)).astype(np.float32)
    ones, zeros = (lambda n: np.ones(n, np.float32)), (lambda n: np.zeros(n, np.float32))
    layer = lambda: dict(ln1_g=ones(D_MODEL), ln1_b=zeros(D_MODEL), wq=normal(D_MODEL, D_MODEL),
                         wk=normal(D_MODEL, D_MODEL), wv=normal(D_MODEL, D_MODEL),
                         wo=normal(D_MODEL, D_MODEL), bo=zeros(D_MODEL), ln2_g=ones(D_MODEL),
                         ln2_b=zeros(D_MODEL), w1=normal(D_MODEL, FFN), b1=zeros(FFN),
                         w2=normal(FFN, D_MODEL), b2=zeros(D_MODEL))
    return dict(wte=normal(VOCAB, D_MODEL), wpe=normal(SEQ, D_MODEL),
                layers=[layer() for _ in range(LAYERS)], lnf_g=ones(D_MODEL), lnf_b=zeros(D_MODEL),
                w_out=normal(D_MODEL, VOCAB))


def param_specs(P, model: str | None) -> dict:
    """Megatron layouts: column-parallel ``wq wk wv w1 b1``, row-parallel ``wo w2``, the rest
    replicated.  ``model=None`` replicates everything."""
    col, row, vec = P(None, model), P(model, None), P(model)
    layer = dict(ln1_g=P(), ln1_b=P(), wq=col, wk=col, wv=col, wo=row, bo=P(), ln2_g=P(),
                 ln2_b=P(), w1=col, b1=vec, w2=row, b2=P())
    return dict(wte=P(), wpe=P(), layers=[dict(layer) for _ in range(LAYERS)], lnf_g=P(),
                lnf_b=P(), w_out=P())


def layer_norm(jnp, x, g, b):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mu) ** 2, axis=-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + 1e-5) * g + b


def gelu(jnp, x):
    return 0.5 * x * (1 + jnp.tanh(0.7978845608 * (x + 0.044715 * x ** 3)))


def attention(jnp, x, p):
    """Causal self-attention over the heads whose columns of ``wq wk wv`` this device holds."""
    b, t, _ = x.shape
    heads = p["wq"].shape[1] // HEAD_DIM
    split = lambda a: a.reshape(b, t, heads, HEAD_DIM)
    q, k, v = split(x @ p["wq"]), split(x @ p["wk"]), split(x @ p["wv"])
    s = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(HEAD_DIM)
    s = jnp.where(np.tril(np.ones((t, t), bool)), s, -1e9)
    s = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    a = s / jnp.sum(s, axis=-1, keepdims=True)
    return jnp.einsum("bhts,bshd->bthd", a, v).reshape(b, t, heads * HEAD_DIM) @ p["wo"]


def loss_fn(jnp, params, x, y, psum_model=lambda a: a):
    """Mean next-byte cross-entropy.  ``psum_model`` sums the partial products of the
    row-parallel ``wo`` and ``w2`` (the identity on global arrays)."""
    h = params["wte"][x] + params["wpe"]
    for p in params["layers"]:
        h = h + psum_model(attention(jnp, layer_norm(jnp, h, p["ln1_g"], p["ln1_b"]), p)) + p["bo"]
        u = gelu(jnp, layer_norm(jnp, h, p["ln2_g"], p["ln2_b"]) @ p["w1"] + p["b1"])
        h = h + psum_model(u @ p["w2"]) + p["b2"]
    logits = layer_norm(jnp, h, params["lnf_g"], params["lnf_b"]) @ params["w_out"]
    top = jnp.max(logits, axis=-1, keepdims=True)
    log_z = jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1)) + top[..., 0]
    picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    return jnp.mean(log_z - picked)


def adam(jax, jnp, params, grads, state, c1, c2):
    """One Adam step; ``c1 = 1 / (1 - beta1**t)`` and ``c2`` are the bias corrections."""
    tree_map = jax.tree_util.tree_map
    m = tree_map(lambda m, g: BETA1 * m + (1 - BETA1) * g, state["m"], grads)
    v = tree_map(lambda v, g: BETA2 * v + (1 - BETA2) * g * g, state["v"], grads)
    params = tree_map(lambda p, m, v: p - LR * (m * c1) / (jnp.sqrt(v * c2) + EPS), params, m, v)
    return params, dict(m=m, v=v)


# ---------------------------------------------------------------------------------------------
# the training step, with shard_map or with the sharding compiler
# ---------------------------------------------------------------------------------------------

def mesh_for(jax, parallel: str, n_devices: int):
    """``dp``: all devices on ``data``; ``tp``: up to 4 (one head each) on ``model``; ``dp_tp``:
    2 x (n / 2), a 2x4 mesh on 8 devices."""
    if parallel == "dp":
        shape, names = (n_devices,), ("data",)
    elif parallel == "tp":
        shape, names = (min(n_devices, HEADS),), ("model",)
    else:
        shape, names = (2, min(n_devices // 2, HEADS)), ("data", "model")
    devices = np.array(jax.devices()[:math.prod(shape)]).reshape(shape)
    return jax.sharding.Mesh(devices, names)


def make_loss(jax, jnp, mesh, compiler: bool = False):
    """``loss(params, x, y)`` on global arrays, and the specs of ``params`` and of the batch:
    a ``shard_map`` of the per-device loss, or (``compiler``) the global loss itself."""
    P = jax.sharding.PartitionSpec
    model = "model" if "model" in mesh.axis_names else None
    data = "data" if "data" in mesh.axis_names else None
    specs, batch = param_specs(P, model), P(data)
    if compiler:
        return (lambda params, x, y: loss_fn(jnp, params, x, y)), specs, batch

    def local_loss(params, x, y):
        psum = (lambda a: jax.lax.psum(a, model)) if model else (lambda a: a)
        value = loss_fn(jnp, params, x, y, psum)
        return jax.lax.pmean(value, data) if data else value
    return (jax.shard_map(local_loss, mesh=mesh, in_specs=(specs, batch, batch), out_specs=P()),
            specs, batch)


def make_step(jax, jnp, mesh, compiler: bool = False):
    """``step(params, state, x, y, c1, c2) -> (params, state, loss)``, jitted, and the
    shardings of ``(params, batch)`` to put the arguments on the mesh with."""
    loss, specs, batch = make_loss(jax, jnp, mesh, compiler)
    P, named = jax.sharding.PartitionSpec, lambda s: jax.sharding.NamedSharding(mesh, s)

    def step(params, state, x, y, c1, c2):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        params, state = adam(jax, jnp, params, grads, state, c1, c2)
        return params, state, value

    shardings = (jax.tree_util.tree_map(named, specs, is_leaf=lambda s: isinstance(s, P)),
                 named(batch))
    if not compiler:
        return jax.jit(step), shardings
    rep = named(P())
    state = dict(m=shardings[0], v=shardings[0])
    return jax.jit(step, in_shardings=(shardings[0], state, shardings[1], shardings[1], rep, rep),
                   out_shardings=(shardings[0], state, rep)), shardings


# ---------------------------------------------------------------------------------------------
# the same GPT with the recipes of spmd.parallel (spmd only), and spmd.optim's Adam
# ---------------------------------------------------------------------------------------------

RECIPES = {
    "fsdp": "FSDP: parameters and Adam state stored 1/n per device, all_gather before use, "
            "psum_scatter of the gradients",
    "zero2": "ZeRO-2: parameters replicated, gradients reduce-scattered, Adam state 1/n",
    "tp_vocab": "Megatron TP with the vocabulary split too: embedding and cross-entropy "
                "never gather the logits",
    "dp_fsdp_tp_pp": "2x2x2: DP and FSDP over data, one layer per pipeline stage (GPipe), "
                     "Megatron TP over model",
}


def recipe_mesh(recipe: str, n_devices: int):
    """``fsdp``/``zero2``: every device on ``data``; ``tp_vocab``: up to 4 on ``model``;
    ``dp_fsdp_tp_pp``: 2 x 2 x 2 (data, stage, model), 8 devices."""
    if recipe in ("fsdp", "zero2"):
        return spmd.make_mesh((n_devices,), ("data",))
    if recipe == "tp_vocab":
        return spmd.make_mesh((min(n_devices, HEADS),), ("model",))
    if n_devices < 8:
        raise SystemExit(f"--parallel {recipe} needs 8 devices (2 x 2 x 2), this job has "
                         f"{n_devices}")
    return spmd.make_mesh((2, 2, 2), ("data", "stage", "model"))


def recipe_params(recipe: str, params: dict) -> dict:
    """The parameters as the recipe holds them: for the pipeline, the layers stacked (one per
    stage)."""
    if recipe != "dp_fsdp_tp_pp":
        return params
    layers = params["layers"]
    return dict({k: v for k, v in params.items() if k != "layers"},
                layers={k: np.stack([layer[k] for layer in layers]) for k in layers[0]})


def _cross_entropy(logits, y):
    top = np.max(logits, axis=-1, keepdims=True)
    log_z = np.log(np.sum(np.exp(logits - top), axis=-1)) + top[..., 0]
    return np.mean(log_z - np.take_along_axis(logits, y[..., None], axis=-1)[..., 0])


def make_recipe_step(recipe: str, mesh, tx):
    """``step(params, state, x, y) -> (loss, params, state)``: one jitted ``shard_map`` of the
    loss, its gradient and ``tx``'s update, laid out by ``recipe``."""
    from spmd import P, pmean, pvary
    from spmd.parallel import fsdp, pipeline, tensor
    optim = spmd.optim
    template = recipe_params(recipe, init_params())
    state = tx.init(template)
    if recipe in ("fsdp", "zero2"):
        state_specs = fsdp.state_specs(state, "data")

        def step(params, state, x, y):
            if recipe == "fsdp":                         # params are this device's shards
                def loss(shards):
                    return pmean(loss_fn(np, fsdp.gather_params(shards, "data"), x, y), "data")
                value, grads = spmd.value_and_grad(loss)(params)
                updates, state = tx.update(grads, state, params)
                return value, optim.apply_updates(params, updates), state
            value, grads = spmd.value_and_grad(lambda p: loss_fn(np, p, x, y))(
                pvary(params, "data"))
            params, state = fsdp.zero_update(tx, grads, state, params, "data", stage=2)
            return pmean(value, "data"), params, state
        specs, batch = (P("data") if recipe == "fsdp" else P()), P("data")
    elif recipe == "tp_vocab":
        col, row = P(None, "model"), P("model", None)
        layer = dict(ln1_g=P(), ln1_b=P(), wq=col, wk=col, wv=col, wo=row, bo=P(), ln2_g=P(),
                     ln2_b=P(), w1=col, b1=P("model"), w2=row, b2=P())
        specs = dict(wte=P("model"), wpe=P(), lnf_g=P(), lnf_b=P(), w_out=col,
                     layers=[layer] * LAYERS)
        state_specs, batch = (optim.ScaleByAdamState(P(), specs, specs), optim.EmptyState()), P()

        def loss(p, x, y):
            psum = lambda a: spmd.psum(a, "model")
            h = tensor.vocab_parallel_embedding(x, p["wte"], "model") + p["wpe"]
            for q in p["layers"]:
                h = h + psum(attention(np, layer_norm(np, h, q["ln1_g"], q["ln1_b"]), q)) + q["bo"]
                u = gelu(np, tensor.column_parallel_linear(
                    layer_norm(np, h, q["ln2_g"], q["ln2_b"]), q["w1"], q["b1"]))
                h = h + tensor.row_parallel_linear(u, q["w2"], "model", q["b2"])
            logits = tensor.column_parallel_linear(
                layer_norm(np, h, p["lnf_g"], p["lnf_b"]), p["w_out"])
            return np.mean(tensor.vocab_parallel_cross_entropy(logits, y, "model"))
    else:
        split_rows = P("stage", ("model", "data"))       # row-parallel, then stored over data
        layer = dict(ln1_g=P("stage", "data"), ln1_b=P("stage", "data"), bo=P("stage", "data"),
                     wq=P("stage", "data", "model"), wk=P("stage", "data", "model"),
                     wv=P("stage", "data", "model"), wo=split_rows, ln2_g=P("stage", "data"),
                     ln2_b=P("stage", "data"), w1=P("stage", "data", "model"), b1=split_rows,
                     w2=split_rows, b2=P("stage", "data"))
        specs = dict(wte=P("data"), wpe=P("data"), lnf_g=P("data"), lnf_b=P("data"),
                     w_out=P("data"), layers=layer)
        state_specs = (optim.ScaleByAdamState(P(), specs, specs), optim.EmptyState())
        batch = P("data")

        def block(p, h):                                  # one stage: a GPT block, Megatron TP
            psum = lambda a: spmd.psum(a, "model")
            h = h + psum(attention(np, layer_norm(np, h, p["ln1_g"], p["ln1_b"]), p)) + p["bo"]
            u = gelu(np, layer_norm(np, h, p["ln2_g"], p["ln2_b"]) @ p["w1"] + p["b1"])
            return h + psum(u @ p["w2"]) + p["b2"]

        def loss(shards, x, y):
            params = fsdp.gather_params(dict(shards, layers={k: v[0] for k, v in
                                                             shards["layers"].items()}), "data")
            h = params["wte"][x] + params["wpe"]
            h = pipeline.gpipe(block, params["layers"], h.reshape((2, -1) + h.shape[1:]), "stage")
            h = layer_norm(np, h.reshape((-1,) + h.shape[2:]), params["lnf_g"], params["lnf_b"])
            return pmean(_cross_entropy(h @ params["w_out"], y), "data")
    if recipe in ("tp_vocab", "dp_fsdp_tp_pp"):
        def step(params, state, x, y):
            value, grads = spmd.value_and_grad(loss)(params, x, y)
            updates, state = tx.update(grads, state, params)
            return value, optim.apply_updates(params, updates), state
    return spmd.jit(spmd.shard_map(step, mesh=mesh, in_specs=(specs, state_specs, batch, batch),
                                   out_specs=(P(), specs, state_specs)))


def train_recipe(recipe: str, steps: int = 30, n_devices: int = 8, progress=None, tx=None):
    """Train ``steps`` steps with ``recipe`` (``RECIPES``) and ``tx`` (default: Adam with this
    file's hyperparameters); returns the losses."""
    tx = tx or spmd.optim.adam(LR, b1=BETA1, b2=BETA2, eps=EPS)
    step = make_recipe_step(recipe, recipe_mesh(recipe, n_devices), tx)
    params = recipe_params(recipe, init_params())
    state, losses, data = tx.init(params), [], batches()
    for t in range(1, steps + 1):
        loss, params, state = step(params, state, *next(data))
        losses.append(float(loss))
        if progress is not None:
            progress(t, losses[-1])
    return losses


def batches(seed: int = 0, position: int = 0):
    """Endless batches of ``(x, y)`` from batch number ``position`` on: random windows of the
    training text's bytes, ``y`` one ahead.  The window starts of the batches before
    ``position`` are drawn and dropped, so a resumed job reads on where its checkpoint says."""
    with open(TEXT, "rb") as f:
        text = np.frombuffer(f.read(), np.uint8).astype(np.int32)
    rng = np.random.default_rng(seed)
    for i in itertools.count():
        starts = rng.integers(0, len(text) - SEQ - 1, BATCH)
        if i < position:
            continue
        window = np.stack([text[s:s + SEQ + 1] for s in starts])
        yield window[:, :-1], window[:, 1:]


def train(jax, jnp, parallel: str = "dp_tp", compiler: bool = False, steps: int = 30,
          n_devices: int = 8, progress=None, checkpoints=None):
    """Train up to step ``steps``; returns the list of losses (Python floats) of the steps run.
    ``checkpoints``: an ``spmd.io.CheckpointManager`` to resume from (its latest step) and to
    save into."""
    mesh = mesh_for(jax, parallel, n_devices)
    step, (param_sh, batch_sh) = make_step(jax, jnp, mesh, compiler)
    params = jax.device_put(init_params(), param_sh)
    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, p.dtype), init_params())
    state = dict(m=jax.device_put(zeros, param_sh), v=jax.device_put(zeros, param_sh))
    done, position = 0, 0
    if checkpoints is not None and checkpoints.latest_step() is not None:
        # the fresh arrays are the target: their shardings lay the saved ones out
        saved = checkpoints.restore(None, dict(params=params, opt=state, step=0, data_position=0))
        params, state, done, position = (saved[k] for k in ("params", "opt", "step",
                                                            "data_position"))
    losses, data = [], batches(position=position)
    for t in range(done + 1, steps + 1):
        x, y = next(data)
        c1, c2 = (np.float32(1 / (1 - b ** t)) for b in (BETA1, BETA2))
        params, state, loss = step(params, state, jax.device_put(x, batch_sh),
                                   jax.device_put(y, batch_sh), c1, c2)
        losses.append(float(loss))
        if progress is not None:
            progress(t, losses[-1])
        if checkpoints is not None:
            checkpoints.save(t, dict(params=params, opt=state, step=t, data_position=t))
    if checkpoints is not None:
        checkpoints.wait_until_finished()
    return losses


def profile_step(parallel: str, compiler: bool, path: str, show: bool = True, top: int = 15):
    """Profile one training step after a warm-up step (which traces and compiles): print the
    equations that take the most time and write the trace to ``path`` (https://ui.perfetto.dev
    opens it)."""
    mesh = mesh_for(spmd, parallel, spmd.device_count())
    step, (param_sh, batch_sh) = make_step(spmd, np, mesh, compiler)
    params = spmd.device_put(init_params(), param_sh)
    zeros = spmd.tree_util.tree_map(np.zeros_like, init_params())
    state = dict(m=spmd.device_put(zeros, param_sh), v=spmd.device_put(zeros, param_sh))
    x, y = (spmd.device_put(a, batch_sh) for a in next(batches()))
    c1, c2 = np.float32(10.0), np.float32(100.0)
    step(params, state, x, y, c1, c2)
    with spmd.profile() as prof:
        float(step(params, state, x, y, c1, c2)[2])
    prof.save_trace(path)
    if show:
        print(prof.table(top=top))
        print(f"trace: {path} (open it in https://ui.perfetto.dev)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallel", choices=("dp", "tp", "dp_tp") + tuple(RECIPES),
                        default="dp_tp", help="dp, tp, dp_tp: shard_map written here; "
                        + "; ".join(f"{k}: {v}" for k, v in RECIPES.items()))
    parser.add_argument("--compiler", action="store_true",
                        help="global code with spmd.jit in_shardings/out_shardings")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--plot", default="gpt_loss.png", help="loss curve (needs matplotlib)")
    parser.add_argument("--profile", action="store_true",
                        help="then profile one step: time per equation, trace in gpt_profile.json")
    parser.add_argument("--out", help="also write the losses of the steps run to this JSON file")
    parser.add_argument("--checkpoint-dir", help="save checkpoints here and resume from the latest")
    parser.add_argument("--checkpoint-every", type=int, default=10,
                        help="save a checkpoint every this many steps")
    args = parser.parse_args(argv)
    if spmd.distributed.detect_environment() is not None:
        spmd.distributed.initialize()           # started by spmd-run, torchrun, SLURM, mpiexec
    lead = spmd.process_index() == 0
    recipe = args.parallel in RECIPES
    if recipe and (args.compiler or args.checkpoint_dir or args.profile):
        parser.error(f"--parallel {args.parallel} (a recipe of spmd.parallel) runs its own "
                     f"shard_map: leave out --compiler, --checkpoint-dir and --profile")
    how = ("spmd.jit shardings" if args.compiler else
           f"spmd.parallel {args.parallel}" if recipe else "shard_map")
    mesh = (recipe_mesh if recipe else lambda p, n: mesh_for(spmd, p, n))(
        args.parallel, spmd.device_count())
    if lead:
        print(f"GPT {LAYERS}x{D_MODEL}, {HEADS} heads, {how} on mesh {dict(mesh.shape)} "
              f"({spmd.process_count()} process(es))")
    checkpoints, done = None, 0
    if args.checkpoint_dir:
        checkpoints = spmd.io.CheckpointManager(args.checkpoint_dir, max_to_keep=2,
                                                save_interval_steps=args.checkpoint_every)
        done = checkpoints.latest_step() or 0
        if lead and done:
            print(f"resumed from step {done}", flush=True)
    bar = tqdm(total=args.steps, initial=done, disable=not lead) if tqdm is not None else None

    def progress(t, loss):
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
        elif lead and (t == 1 or t % 5 == 0):
            print(f"step {t:3d}  loss {loss:.4f}", flush=True)

    t0 = time.perf_counter()
    if recipe:
        losses = train_recipe(args.parallel, args.steps, spmd.device_count(), progress)
    else:
        losses = train(spmd, np, args.parallel, args.compiler, args.steps, spmd.device_count(),
                       progress, checkpoints)
    if bar is not None:
        bar.close()
    if lead and losses:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} steps, "
              f"{time.perf_counter() - t0:.1f} s")
        _plot(losses, args.plot, f"{how}, mesh {dict(mesh.shape)}", first=done + 1)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(losses, f)
    if args.profile:
        one = spmd.process_count() == 1
        profile_step(args.parallel, args.compiler,
                     "gpt_profile.json" if one else f"gpt_profile.rank{spmd.process_index()}.json",
                     show=lead)


def _plot(losses, path, title, first=1):
    try:       # optional (the `examples` extra): the loss curve as a picture
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(pip install matplotlib for a picture of the loss curve)")
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(first, first + len(losses)), losses)
    ax.set(xlabel="step", ylabel="cross-entropy (nats per byte)", title=f"GPT: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"loss curve saved to {path}")


if __name__ == "__main__":
    main()
