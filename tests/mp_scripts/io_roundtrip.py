"""Checkpoints across processes, under ``spmd-run -n N`` (N = 2 or 4, one device each).

``io_roundtrip.py DIR``: the dtypes of ``test_io.MP_DTYPES``, one array per layout of
``test_io.mp_layouts(N)`` (uneven dims included), saved blocking to ``DIR/mp<N>`` and in the
background to ``DIR/mp<N>-async``; then ``DIR/single`` (written by one process on a 2x4
simulated mesh) and every ``DIR/mp<M>`` (written by M processes, this job's included) are
loaded onto every N-process layout and each addressable shard is compared bit for bit with the
global data.  Each process counts the bytes tensorstore
read on one resharded load and checks they are exactly the chunks its block overlaps (plus the
array's zarr.json).  Prints ``OK io from <the sources loaded> ...``.
"""
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import spmd  # noqa: E402

import test_io as T  # noqa: E402

spmd.distributed.initialize()
N, me = spmd.process_count(), spmd.process_index()
root = sys.argv[1]
mesh, layouts = T.mp_layouts(N)

tree = {dt.name: {name: spmd.device_put(T.make_data(dt, T.SHAPE, seed=i),
                                        spmd.NamedSharding(mesh, spec))
                  for name, spec in layouts.items()} for i, dt in enumerate(T.MP_DTYPES)}
spmd.io.save(os.path.join(root, f"mp{N}"), tree)
handle = spmd.io.save(os.path.join(root, f"mp{N}-async"), tree, block=False)
checks = 0
sources = ["single", *sorted(p for p in os.listdir(root)           # committed, not the async
                             if re.fullmatch(r"mp\d+", p) and p != f"mp{N}"), f"mp{N}"]
for source in sources:
    for load_name, load_spec in layouts.items():
        sharding = spmd.NamedSharding(mesh, load_spec)
        target = {dt.name: {name: sharding for name in T.save_names(source)} for dt in T.MP_DTYPES}
        back = spmd.io.load(os.path.join(root, source), target)
        for i, dt in enumerate(T.MP_DTYPES):
            want = T.make_data(dt, T.SHAPE, seed=i)
            for a in back[dt.name].values():
                assert a.sharding.spec == load_spec and a.shape == T.SHAPE and a.dtype == dt
                for s in a.addressable_shards:
                    T.assert_bits_equal(s.data, want[s.index], f"{source} {dt} {load_name}")
                    checks += 1
handle.wait()

# bytes read on a resharded load: exactly the chunks this process's block overlaps
name, spec = "float32", list(layouts.values())[0]
path = os.path.join(root, "single")
before = T.bytes_read()
a = spmd.io.load(path, {name: {"rows": spmd.NamedSharding(mesh, spec)}})[name]["rows"]
got = T.bytes_read() - before
want = T.expected_bytes(os.path.join(path, f"{name}.rows"), [s.index for s in a.addressable_shards])
assert got == want, f"process {me} read {got} bytes, its chunks are {want}"
total = T.expected_bytes(os.path.join(path, f"{name}.rows"), [tuple(slice(None) for _ in T.SHAPE)])
assert got < total, (got, total)
print(f"OK io from {' '.join(sources)}: {checks} shards, {got} of {total} bytes", flush=True)
