"""Quick start: a device mesh, an array laid out over it, a picture of the layout, and back.

    make demo                       # or: python examples/quickstart.py

spmd simulates 8 CPU devices in this one process (set SPMD_NUM_CPU_DEVICES to change that),
so this runs anywhere, in a second or two.
"""
import numpy as np
from rich.console import Console

import spmd
from spmd import P, NamedSharding

console = Console()


def section(title: str) -> None:
    console.print()
    console.rule(f"[bold]{title}")


# ---------------------------------------------------------------------------------------------
section("1. Devices and a mesh")
print(f"{spmd.device_count()} devices: {spmd.devices()}")
# A mesh arranges the devices in a grid and names its axes; here 2 rows ("data") x 4 columns
# ("model").  Programs refer to mesh axes by name, never by device number.
mesh = spmd.make_mesh((2, 4), ("data", "model"))
print(mesh)
print("device ids on the mesh:\n", mesh.device_ids, sep="")

# ---------------------------------------------------------------------------------------------
section("2. Put an array on the mesh")
x = np.arange(32, dtype=np.float32).reshape(8, 4)
# P("data", "model"): split dim 0 over the "data" axis and dim 1 over the "model" axis.
sharding = NamedSharding(mesh, P("data", "model"))
xs = spmd.device_put(x, sharding)
print(f"global shape {xs.shape}, dtype {xs.dtype}, each device holds {sharding.shard_shape(x.shape)}")
spmd.visualize_sharding(xs)

print("\nthe shards, one per device:")
for shard in xs.addressable_shards[:3]:
    rows, cols = shard.index
    print(f"  {shard.device} holds x[{rows.start}:{rows.stop}, {cols.start}:{cols.stop}]"
          f" = {shard.data.ravel().tolist()}")
print("  ...")

# ---------------------------------------------------------------------------------------------
section("3. Replication, uneven blocks and any rank")
# A mesh axis that the spec does not name replicates: every block is on 4 devices.
spmd.visualize_sharding(spmd.device_put(x, NamedSharding(mesh, P("data"))))
# 10 rows over 4 devices: blocks of 3, 3, 3 and 1 (JAX requires even division; spmd does not).
print()
spmd.visualize_sharding(spmd.device_put(np.zeros((10, 3)), NamedSharding(mesh, P("model"))))
# Rank 3: one grid per block of the leading dim.
print()
cube = spmd.make_mesh((2, 2, 2), ("pipe", "data", "model"))
spmd.visualize_sharding(spmd.device_put(np.zeros((4, 6, 8)), NamedSharding(cube, P("pipe", "data", "model"))))

# ---------------------------------------------------------------------------------------------
section("4. Reshard and gather back")
ys = spmd.reshard(xs, NamedSharding(mesh, P(None, ("data", "model"))))
print(f"resharded to {ys.sharding.spec}: each device now holds {ys.addressable_shards[0].data.shape}")
back = np.asarray(ys)  # gathers the blocks into one host array
assert np.array_equal(back, x) and back.dtype == x.dtype
print(f"np.asarray(...) == x: {np.array_equal(back, x)}  (dtype {back.dtype}, shape {back.shape})")
print("row sums, computed by NumPy on the gathered array:", back.sum(axis=1).tolist())

# --- shard_map and collectives: see below ---
from spmd import shard_map, psum, all_gather  # noqa: E402

# ---------------------------------------------------------------------------------------------
section("5. shard_map: one program per device, collectives by axis name")
# The body sees its own 4x1 block; psum over "model" adds the partial row sums of the four
# devices in each row of the mesh.  out_specs P("data") says the result is split over "data"
# and the same on every device along "model" -- which the types check.


@shard_map(mesh=mesh, in_specs=P("data", "model"), out_specs=P("data"))
def rowsum(block):
    return psum(block.sum(axis=1), "model")


r = rowsum(xs)
assert np.array_equal(np.asarray(r), x.sum(axis=1))
print("rowsum(x) =", np.asarray(r).tolist(), " (== x.sum(axis=1))")
print("\nthe program it traced (per-device shapes, {axes} the value varies over):")
program = spmd.make_program(rowsum)(xs)
print(program)
spmd.print_collectives(program)

# ---------------------------------------------------------------------------------------------
section("6. A Megatron-style layer: column-parallel then row-parallel")
rng = np.random.default_rng(0)
h, w1, w2 = (rng.standard_normal(s).astype(np.float32) for s in ((8, 16), (16, 32), (32, 16)))


@shard_map(mesh=mesh, in_specs=(P("data"), P(None, "model"), P("model")), out_specs=P("data"))
def mlp(h, w1, w2):
    # w1 is split by columns and w2 by rows over "model": the hidden activation never moves,
    # and one psum finishes the second matmul.
    return psum(np.tanh(h @ w1) @ w2, "model")


out = mlp(h, w1, w2)
assert np.allclose(np.asarray(out), np.tanh(h @ w1) @ w2, atol=1e-4)
print("matches NumPy on the whole arrays:", np.allclose(np.asarray(out), np.tanh(h @ w1) @ w2, atol=1e-4))
spmd.visualize_sharding(out)
spmd.print_collectives(spmd.make_program(mlp)(h, w1, w2))
