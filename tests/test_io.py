"""spmd.io: sharded checkpoints.

- Round trips are bit-exact for every dtype, saved on 2x4 (five specs), 8-way and one device,
  loaded onto 4x2, 8-way, one device and other specs (uneven dims), each chunk read once; across
  1, 2 and 4 processes (``mp_scripts/io_roundtrip.py``: 4 processes read what 1 wrote, 2 what 1
  and 4 wrote, 1 what 2 and 4 wrote), where each process reads only the chunks its block overlaps.
- A save killed with SIGKILL at each of its five phases leaves the previous step loadable, bit
  for bit; the partial folder is ignored, then removed.
- A flipped byte in a chunk is an error naming the array and the chunk.
- orbax reads what spmd wrote into ``jax.Array``s, and spmd reads what orbax wrote (its default
  OCDBT format and zarr v3), both bit for bit.
- Background saves, the manager (interval, retention, latest step) and the errors; without
  tensorstore (the ``io`` extra) ``import spmd`` works and ``spmd.io`` names the extra.
- A 2-process training job (``examples/train_gpt.py``, ``examples/checkpoint_resume.py``)
  whose rank 1 is SIGKILLed mid-run restarts under ``spmd-run --max-restarts 1``, resumes from
  the last checkpoint and gives the losses of an uninterrupted run, bit for bit.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import types

import ml_dtypes
import numpy as np
import pytest

import spmd
from spmd import P, NamedSharding
from spmd.array import SUPPORTED_DTYPES

from _mp import needs_mpi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "tests", "mp_scripts")
DTYPES = SUPPORTED_DTYPES
SHAPE = (10, 6)                     # uneven over 4 and 8 ways
MP_DTYPES = tuple(np.dtype(t) for t in (np.bool_, np.int8, np.uint64, ml_dtypes.bfloat16,
                                         np.float32, np.complex128))
SINGLE_LAYOUTS = {"rows": P("data", "model"), "cols": P("model", "data"),
                  "flat": P(("data", "model")), "model": P(None, "model"), "repl": P()}


# ---------------------------------------------------------------------------------------------
# helpers (also used by mp_scripts/io_roundtrip.py)
# ---------------------------------------------------------------------------------------------

def make_data(dtype, shape, seed):
    """Random bits of ``dtype`` (NaN payloads and all), the same on every process."""
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    raw = rng.integers(0, 256, int(np.prod(shape)) * dtype.itemsize, np.uint8)
    return raw.view(dtype).reshape(shape)


def assert_bits_equal(got, want, what=""):
    got, want = np.asarray(got), np.asarray(want)
    assert (got.shape, got.dtype) == (want.shape, want.dtype), (what, got.shape, got.dtype)
    assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), what


# the specs an n-process job (one device each) saves and loads, on the mesh of mp_layouts(n)
MP_LAYOUTS = {2: {"rows": P("x"), "cols": P(None, "x"), "repl": P()},
              4: {"rows": P("data", "model"), "cols": P("model", "data"),
                  "flat": P(("data", "model")), "model": P(None, "model"), "repl": P()}}


def mp_layouts(n):
    """The mesh of an n-process job and the specs saved and loaded there."""
    shape, names = ((2,), ("x",)) if n == 2 else ((2, 2), ("data", "model"))
    return spmd.make_mesh(shape, names), MP_LAYOUTS[n]


def save_names(source):
    if source == "single":
        return [*SINGLE_LAYOUTS, "x8", "one"]
    return list(MP_LAYOUTS[int(source[2:].split("-")[0])])


def single_tree(dtype, seed):
    """One array per layout of one process: five specs on 2x4, 8-way, one device."""
    mesh = spmd.make_mesh((2, 4), ("data", "model"))
    x = make_data(dtype, SHAPE, seed)
    tree = {name: spmd.device_put(x, NamedSharding(mesh, spec))
            for name, spec in SINGLE_LAYOUTS.items()}
    tree["x8"] = spmd.device_put(x, NamedSharding(spmd.make_mesh((8,), ("x",)), P("x")))
    tree["one"] = spmd.device_put(x, NamedSharding(spmd.make_mesh((1,), ("x",)), P("x")))
    return tree


def load_layouts():
    m42 = spmd.make_mesh((4, 2), ("a", "b"))
    return {"4x2": NamedSharding(m42, P("a", "b")), "4x2-t": NamedSharding(m42, P("b", "a")),
            "4x2-flat-cols": NamedSharding(m42, P(None, ("a", "b"))),
            "4x2-repl": NamedSharding(m42, P()),
            "8-way": NamedSharding(spmd.make_mesh((8,), ("x",)), P("x")),
            "one-device": NamedSharding(spmd.make_mesh((1,), ("x",)), P())}


def bytes_read() -> int:
    import tensorstore as ts  # noqa: PLC0415 (the storage layer's own counter)
    found = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
    return sum(v["value"] for m in found for v in m["values"])


def expected_bytes(array_dir, indices) -> int:
    """zarr.json plus every chunk file that the blocks ``indices`` overlap."""
    with open(os.path.join(array_dir, "zarr.json")) as f:
        meta = json.load(f)
    shape, chunk = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
    chunks = set()
    for index in indices:
        ranges = []
        for s, d, c in zip(index, shape, chunk):
            lo, hi = s.indices(d)[:2]
            ranges.append(range(lo // c, -(-hi // c)) if hi > lo else range(0))
        chunks |= {tuple(r[i] for r, i in zip(ranges, ix)) for ix in np.ndindex(*map(len, ranges))}
    files = [os.path.join(array_dir, "c", *map(str, c)) for c in chunks]
    return os.path.getsize(os.path.join(array_dir, "zarr.json")) + sum(map(os.path.getsize, files))


# ---------------------------------------------------------------------------------------------
# round trips in one process
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_table_one_process(tmp_path, dtype):
    """Seven save layouts x six load layouts, bit for bit, with the saved specs in metadata;
    each load reads every chunk once (replicated or straddled blocks included)."""
    tree = single_tree(dtype, seed=1)
    spmd.io.save(tmp_path / "ck", tree)
    meta = spmd.io.metadata(tmp_path / "ck")
    for name, a in tree.items():
        assert meta[name].shape == SHAPE and meta[name].dtype == dtype
        assert meta[name].spec == a.sharding.spec
        assert meta[name].mesh_shape == dict(a.sharding.mesh.shape)
    want = make_data(dtype, SHAPE, seed=1)
    whole = [(slice(None),) * len(SHAPE)]
    every_chunk = sum(expected_bytes(tmp_path / "ck" / name, whole) for name in tree)
    for load_name, sharding in load_layouts().items():
        before = bytes_read()
        back = spmd.io.load(tmp_path / "ck", {name: sharding for name in tree})
        assert bytes_read() - before == every_chunk, load_name
        for name, a in back.items():
            assert a.sharding == sharding
            assert_bits_equal(np.asarray(a), want, f"{name} -> {load_name}")
            for s in a.addressable_shards:
                assert_bits_equal(s.data, want[s.index], f"{name} -> {load_name} shard")


def test_targets_may_be_arrays_shape_dtype_structs_specs_and_host_values(tmp_path):
    mesh = spmd.make_mesh((2, 4), ("data", "model"))
    x = np.random.default_rng(2).standard_normal((8, 12)).astype(np.float32)
    tree = {"w": spmd.device_put(x, NamedSharding(mesh, P("data", "model"))), "step": 41,
            "lr": np.float32(0.5),
            "opt": [np.arange(5.0), {"mu": np.ones((3, 2), ml_dtypes.bfloat16)}]}
    spmd.io.save(tmp_path / "ck", tree)
    m42 = spmd.make_mesh((4, 2), ("a", "b"))
    like = spmd.device_put(np.zeros((8, 12), np.float32), NamedSharding(m42, P("b")))
    struct = types.SimpleNamespace(shape=(8, 12), dtype=np.float32,
                                   sharding=NamedSharding(m42, P("a")))
    with spmd.set_mesh(m42):
        for target in (like, struct, P(None, "a"), NamedSharding(mesh, P())):
            back = spmd.io.load(tmp_path / "ck", {"w": target, "step": 0, "lr": np.float32(0),
                                                   "opt": [np.zeros(5), {"mu": np.zeros((3, 2))}]})
            assert_bits_equal(np.asarray(back["w"]), x)
            assert back["step"] == 41 and type(back["step"]) is int
            assert back["lr"] == 0.5
            assert_bits_equal(back["opt"][0], tree["opt"][0])
            assert_bits_equal(back["opt"][1]["mu"], tree["opt"][1]["mu"])
    as_f16 = types.SimpleNamespace(shape=(8, 12), dtype=np.float16,
                                   sharding=NamedSharding(m42, P("a")))
    back = spmd.io.load(tmp_path / "ck", {"w": as_f16})
    assert back["w"].dtype == np.float16
    assert np.array_equal(np.asarray(back["w"]), x.astype(np.float16))
    ShapeDtypeStruct = getattr(spmd, "ShapeDtypeStruct", None)
    if ShapeDtypeStruct is not None:
        struct = ShapeDtypeStruct((8, 12), np.float32, sharding=NamedSharding(m42, P("a")))
        back = spmd.io.load(tmp_path / "ck", {"w": struct})
        assert_bits_equal(np.asarray(back["w"]), x)


def test_metadata_reads_no_array_data(tmp_path):
    mesh = spmd.make_mesh((2, 4), ("data", "model"))
    w = spmd.device_put(np.ones((4, 8), ml_dtypes.bfloat16),
                        NamedSharding(mesh, P(None, ("data", "model"))))
    tree = {"layers": [{"w": w}] * 2, "step": 7}
    spmd.io.save(tmp_path / "ck", tree, step=7)
    before = bytes_read()
    meta = spmd.io.metadata(tmp_path / "ck")
    assert bytes_read() == before
    assert isinstance(meta["layers"], list) and len(meta["layers"]) == 2
    w = meta["layers"][1]["w"]
    assert (w.shape, w.dtype, w.spec, w.kind) == ((4, 8), np.dtype(ml_dtypes.bfloat16),
                                                  P(None, ("data", "model")), "jax.Array")
    assert meta["step"].kind == "scalar"
    with open(tmp_path / "ck" / "_METADATA") as f:
        assert json.load(f)["spmd"]["step"] == 7


# ---------------------------------------------------------------------------------------------
# across processes
# ---------------------------------------------------------------------------------------------

def spmd_run(*args, timeout=60, env=None):
    full_env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    p = subprocess.run([sys.executable, "-m", "spmd.run", *args], cwd=ROOT, env=full_env,
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
@needs_mpi
def test_round_trip_across_processes(tmp_path):
    """One process saves on 2x4; then 4 processes, then 2, save (blocking and in the
    background) and load every checkpoint there so far onto their layouts: 4 processes read
    what one wrote, 2 read what one and what 4 wrote.  One process loads what 2 and 4 wrote onto
    2x4, 4x2, 8-way and one device."""
    tree = {dt.name: single_tree(dt, seed=i) for i, dt in enumerate(MP_DTYPES)}
    spmd.io.save(tmp_path / "single", tree)
    for n, sources in ((4, "single mp4"), (2, "single mp4 mp2")):
        code, out, err = spmd_run("-n", str(n), os.path.join(SCRIPTS, "io_roundtrip.py"),
                                  str(tmp_path), timeout=80)
        assert code == 0, (out + err)[-3000:]
        assert out.count(f"OK io from {sources}") == n, out
    for source in ("mp2", "mp2-async", "mp4", "mp4-async"):
        names = save_names(source)
        for load_name, sharding in load_layouts().items():
            target = {dt.name: {k: sharding for k in names} for dt in MP_DTYPES}
            back = spmd.io.load(tmp_path / source, target)
            for i, dt in enumerate(MP_DTYPES):
                want = make_data(dt, SHAPE, seed=i)
                for name, a in back[dt.name].items():
                    assert_bits_equal(np.asarray(a), want, f"{source} {dt} {name} -> {load_name}")


# ---------------------------------------------------------------------------------------------
# atomicity: kill -9 during a save
# ---------------------------------------------------------------------------------------------

PHASES = ["metadata", "chunks", "done", "commit", "cleanup"]
RANDOM = [f"random-{k}" for k in range(5)]


@pytest.mark.timeout(90)
def test_kill_during_save_leaves_previous_step_loadable(tmp_path):
    """Step 1 is committed; the save of step 2 is stopped at each phase (in forked processes,
    all at once) and killed with SIGKILL, and five more saves are killed at random times.
    Step 1 loads bit for bit; a partial step 2 is not listed and the next manager removes it;
    killed after the rename, step 2 is whole."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    job = subprocess.Popen([sys.executable, os.path.join(SCRIPTS, "io_kill.py"), str(tmp_path),
                            *PHASES, *RANDOM], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    try:
        paused, lines = set(), []
        while paused != set(PHASES):
            line = job.stderr.readline()
            assert line, "".join(lines)[-3000:]
            lines.append(line)
            paused |= {p for p in PHASES if f"paused at {p}" in line}
        for phase in PHASES:
            os.kill(int((tmp_path / phase / "pid").read_text()), signal.SIGKILL)
        delays = dict(zip(RANDOM, np.random.default_rng().uniform(0, 0.2, len(RANDOM))))
        for phase in RANDOM:
            while not (tmp_path / phase / "pid").exists() and job.poll() is None:
                time.sleep(0.001)
            time.sleep(delays[phase])              # a save of step 2 takes about 0.1 s
            with contextlib.suppress(ProcessLookupError):
                os.kill(int((tmp_path / phase / "pid").read_text()), signal.SIGKILL)
        job.wait(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait(timeout=30)
        job.stderr.close()
    sys.path.insert(0, SCRIPTS)
    import io_kill  # noqa: PLC0415 (the script's own data and tree)
    for phase in PHASES + RANDOM:
        folder = tmp_path / phase
        leftovers = [p for p in os.listdir(folder) if ".partial-" in p]
        mgr = spmd.io.CheckpointManager(folder, max_to_keep=3)
        if phase in PHASES:
            committed = phase == "cleanup"
            assert mgr.all_steps() == ([1, 2] if committed else [1]), phase
            assert bool(leftovers) != committed, (phase, leftovers)
        assert mgr.all_steps() in ([1], [1, 2]), (phase, delays)
        assert not [p for p in os.listdir(folder) if ".partial-" in p], phase
        for step in mgr.all_steps():
            back = mgr.restore(step, io_kill.target())
            for name, want in io_kill.data(step).items():
                assert_bits_equal(np.asarray(back[name]), want,
                                  f"{phase} step {step} {name} (kill delays {delays})")
        with pytest.raises(spmd.io.CheckpointError, match="not a checkpoint"):
            spmd.io.load(folder / "3", io_kill.target())


# ---------------------------------------------------------------------------------------------
# checksums
# ---------------------------------------------------------------------------------------------

def test_flipped_byte_names_the_array_and_the_chunk(tmp_path):
    mesh = spmd.make_mesh((2, 4), ("data", "model"))
    x = make_data(np.float32, (8, 8), seed=3)
    w = spmd.device_put(x, NamedSharding(mesh, P("data", "model")))
    spmd.io.save(tmp_path / "ck", {"params": {"w": w}})
    chunk = tmp_path / "ck" / "params.w" / "c" / "1" / "2"
    raw = bytearray(chunk.read_bytes())
    raw[5] ^= 0x10
    chunk.write_bytes(bytes(raw))
    target = {"params": {"w": NamedSharding(mesh, P())}}
    with pytest.raises(spmd.io.CheckpointError, match=r"'params\.w', chunk \(1,2\).*crc32c"):
        spmd.io.load(tmp_path / "ck", target)


# ---------------------------------------------------------------------------------------------
# orbax interop
# ---------------------------------------------------------------------------------------------

def test_orbax_reads_what_spmd_wrote(tmp_path):
    jax = pytest.importorskip("jax")
    ocp = pytest.importorskip("orbax.checkpoint")
    from jax.sharding import NamedSharding as JaxSharding, PartitionSpec as JaxP  # noqa: PLC0415
    mesh = spmd.make_mesh((2, 4), ("data", "model"))
    w, b = make_data(np.float32, (8, 16), 4), make_data(ml_dtypes.bfloat16, (16,), 5)
    params = {"w": spmd.device_put(w, NamedSharding(mesh, P("data", "model"))),
              "b": spmd.device_put(b, NamedSharding(mesh, P("model")))}
    spmd.io.save(tmp_path / "ck", {"params": params, "step": 12,
                                   "layers": [np.arange(6, dtype=np.int32)]})
    jm = jax.make_mesh((4, 2), ("a", "b"))
    target = {"params": {
        "w": jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=JaxSharding(jm, JaxP("b", "a"))),
        "b": jax.ShapeDtypeStruct(b.shape, b.dtype, sharding=JaxSharding(jm, JaxP("a")))},
              "step": 0, "layers": [np.zeros(6, np.int32)]}
    back = ocp.StandardCheckpointer().restore(str(tmp_path / "ck"), target)
    assert isinstance(back["params"]["w"], jax.Array)
    assert back["params"]["w"].sharding == target["params"]["w"].sharding
    assert_bits_equal(np.asarray(back["params"]["w"]), w)
    assert_bits_equal(np.asarray(back["params"]["b"]), b)
    assert back["step"] == 12
    assert_bits_equal(np.asarray(back["layers"][0]), np.arange(6, dtype=np.int32))


@pytest.mark.parametrize("ocdbt", [True, False], ids=["orbax-default-ocdbt", "zarr3"])
def test_spmd_reads_what_orbax_wrote(tmp_path, ocdbt):
    jax = pytest.importorskip("jax")
    ocp = pytest.importorskip("orbax.checkpoint")
    from jax.sharding import NamedSharding as JaxSharding, PartitionSpec as JaxP  # noqa: PLC0415
    jm = jax.make_mesh((2, 4), ("data", "model"))
    w, b = make_data(np.float32, (8, 16), 6), make_data(ml_dtypes.bfloat16, (16,), 7)
    tree = {"params": {"w": jax.device_put(w, JaxSharding(jm, JaxP("data", "model"))),
                       "b": jax.device_put(b, JaxSharding(jm, JaxP("model")))},
            "step": 5, "layers": [np.arange(6, dtype=np.int32)]}
    if ocdbt:
        ck = ocp.StandardCheckpointer()
        ck.save(str(tmp_path / "ck"), tree)
        ck.wait_until_finished()
    else:
        ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=True)).save(
            str(tmp_path / "ck"), args=ocp.args.PyTreeSave(tree))
    m42 = spmd.make_mesh((4, 2), ("a", "b"))
    eight = NamedSharding(spmd.make_mesh((8,), ("x",)), P("x"))
    for sharding in (NamedSharding(m42, P("b", "a")), eight):
        back = spmd.io.load(tmp_path / "ck", {
            "params": {"w": sharding, "b": NamedSharding(m42, P("a"))},
            "step": 0, "layers": [np.zeros(6)]})
        assert back["params"]["w"].sharding == sharding
        assert_bits_equal(np.asarray(back["params"]["w"]), w)
        assert_bits_equal(np.asarray(back["params"]["b"]), b)
        assert back["step"] == 5
        assert_bits_equal(back["layers"][0], np.arange(6, dtype=np.int32))
    meta = spmd.io.metadata(tmp_path / "ck")
    assert meta["params"]["w"].shape == (8, 16) and meta["params"]["b"].dtype == ml_dtypes.bfloat16


# ---------------------------------------------------------------------------------------------
# background saves and the manager
# ---------------------------------------------------------------------------------------------

def test_background_save_copies_on_the_callers_thread(tmp_path):
    mesh = spmd.make_mesh((2, 4), ("data", "model"))
    host = make_data(np.float64, (64, 64), seed=8)
    want = host.copy()
    w = spmd.device_put(make_data(np.float32, (64, 32), seed=9),
                        NamedSharding(mesh, P("data", "model")))
    handle = spmd.io.save(tmp_path / "ck", {"host": host, "w": w}, block=False)
    host[:] = 0                        # training goes on and overwrites its buffers
    handle.wait()
    back = spmd.io.load(tmp_path / "ck", {"host": np.zeros(1), "w": NamedSharding(mesh, P())})
    assert_bits_equal(back["host"], want)
    assert_bits_equal(np.asarray(back["w"]), np.asarray(w))
    spmd.io.save(tmp_path / "ck2", {"w": w}, block=False)
    spmd.io.wait_until_finished()
    back = spmd.io.load(tmp_path / "ck2", {"w": w.sharding})
    assert_bits_equal(np.asarray(back["w"]), np.asarray(w))


def test_manager_interval_retention_and_latest(tmp_path):
    mesh = spmd.make_mesh((2, 4), ("data", "model"))
    sharding = NamedSharding(mesh, P("data"))
    with spmd.io.CheckpointManager(tmp_path, max_to_keep=2, save_interval_steps=2) as mgr:
        assert mgr.latest_step() is None
        tree = lambda s: {"w": spmd.device_put(make_data(np.float32, (8, 3), s), sharding),
                          "step": s}
        saved = [s for s in range(7) if mgr.save(s, tree(s))]
        mgr.wait_until_finished()
        assert saved == [0, 2, 4, 6]
        assert mgr.all_steps() == [4, 6] and mgr.latest_step() == 6
        back = mgr.restore(None, {"w": NamedSharding(mesh, P(None, "model")), "step": 0})
        assert back["step"] == 6
        assert_bits_equal(np.asarray(back["w"]), make_data(np.float32, (8, 3), 6))
        assert not mgr.save(6, {"w": back["w"], "step": 6})


def test_errors_name_the_leaf_and_the_fix(tmp_path):
    mesh = spmd.make_mesh((2, 4), ("data", "model"))
    w = spmd.device_put(np.ones((8, 4), np.float32), NamedSharding(mesh, P("data")))
    spmd.io.save(tmp_path / "ck", {"params": {"w": w}})
    with pytest.raises(spmd.io.CheckpointError, match="already exists"):
        spmd.io.save(tmp_path / "ck", {"params": {"w": w}})
    with pytest.raises(spmd.io.CheckpointError,
                       match=r"'params\.w' has shape \(4, 4\).*holds \(8, 4\)"):
        spmd.io.load(tmp_path / "ck", {"params": {"w": types.SimpleNamespace(
            shape=(4, 4), dtype=np.float32, sharding=w.sharding)}})
    with pytest.raises(spmd.io.CheckpointError, match=r"'params\.b', which .* does not hold"):
        spmd.io.load(tmp_path / "ck", {"params": {"b": w.sharding}})
    with pytest.raises(spmd.io.CheckpointError, match=r"leaf at 'opt\.0' is a object"):
        spmd.io.save(tmp_path / "ck2", {"opt": [object()]})
    os.remove(tmp_path / "ck" / "commit_success.txt")
    with pytest.raises(spmd.io.CheckpointError, match="no commit marker"):
        spmd.io.load(tmp_path / "ck", {"params": {"w": w.sharding}})
    with pytest.raises(ValueError, match="max_to_keep=0"):
        spmd.io.CheckpointManager(tmp_path / "m", max_to_keep=0)


_WITHOUT_TENSORSTORE = r"""
import os, sys, numpy as np, pytest, spmd
assert "tensorstore" not in sys.modules, "import spmd loaded tensorstore"
sys.modules["tensorstore"] = None                  # as if it were not installed
root = sys.argv[1]
w = spmd.device_put(np.ones((4, 2)), spmd.NamedSharding(spmd.make_mesh((2,), ("x",)), spmd.P("x")))
calls = [lambda: spmd.io.save(root + "/ck", {"w": w}),
         lambda: spmd.io.save(root + "/ck", {"w": w}, block=False),
         lambda: spmd.io.load(root + "/orbax", {"w": w.sharding}),
         lambda: spmd.io.CheckpointManager(root + "/mgr")]
for call in calls:
    with pytest.raises(ImportError, match=r"tensorstore.*pip install 'spmd\[io\]'"):
        call()
print("OK", sorted(os.listdir(root)))
"""


def test_tensorstore_is_optional_and_its_absence_names_the_extra(tmp_path):
    """tensorstore is the ``io`` extra: ``import spmd`` does not load it, and without it every
    entry point of ``spmd.io`` raises an ImportError naming ``pip install 'spmd[io]'`` on the
    caller's thread, before writing anything."""
    (tmp_path / "orbax").mkdir()             # a checkpoint's JSON only: its arrays need tensorstore
    (tmp_path / "orbax" / "_METADATA").write_text(json.dumps({"tree_metadata": {"('w',)": {
        "key_metadata": [{"key": "w", "key_type": 2}],
        "value_metadata": {"value_type": "jax.Array"}}}}))
    p = subprocess.run([sys.executable, "-c", _WITHOUT_TENSORSTORE, str(tmp_path)], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "OK ['orbax']", p.stdout


# ---------------------------------------------------------------------------------------------
# resume after a kill
# ---------------------------------------------------------------------------------------------

# the examples that resume, with the arguments of a short run saving every 2 steps
RESUMABLE = {"checkpoint_resume": ["--steps", "7", "--every", "2"],
             "train_gpt": ["--steps", "6", "--checkpoint-every", "2", "--plot", "{tmp}/loss.png"]}


@pytest.mark.multiprocess
@pytest.mark.timeout(200)
@needs_mpi
@pytest.mark.parametrize("example", list(RESUMABLE))
def test_training_resumes_after_a_rank_is_killed(tmp_path, example):
    """``examples/<example>.py --checkpoint-dir D`` under ``spmd-run -n 2 --max-restarts 1``
    with ``SPMD_IO_KILL_AT_STEP=5``: rank 1 SIGKILLs itself when step 5 is to be saved, the
    launcher restarts the job, which resumes from the last committed step (4), and every loss
    after it equals, bit for bit, the same job's when nothing is killed (run at the same time).
    The checkpoint holds the parameters, the optimizer state, the step (and, for the GPT, the
    position in the data)."""
    script = os.path.join(ROOT, "examples", f"{example}.py")
    args = [a.format(tmp=tmp_path) for a in RESUMABLE[example]]

    def job(name, launcher=(), env=None):
        cmd = [sys.executable, "-m", "spmd.run", "-n", "2", *launcher, script, *args,
               "--checkpoint-dir", str(tmp_path / name), "--out", str(tmp_path / f"{name}.json")]
        env = dict(os.environ, PYTHONPATH=ROOT, SPMD_RUN_DIR=str(tmp_path / "runs"), **env or {})
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    jobs = {"uninterrupted": job("uninterrupted"),
            "killed": job("killed", ("--max-restarts", "1"), {"SPMD_IO_KILL_AT_STEP": "5"})}
    try:
        outputs = {name: p.communicate(timeout=180) for name, p in jobs.items()}
    finally:
        for p in jobs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()
    for name, p in jobs.items():
        assert p.returncode == 0, (name, "".join(outputs[name])[-3000:])
    out, err = outputs["killed"]
    assert "process 1 kills itself with SIGKILL" in err, err[-3000:]
    assert "rank 1 failed first: killed by signal SIGKILL" in err, err[-3000:]
    assert "restarting the job (1 of 1 restarts)" in err, err[-3000:]
    assert "[0] resumed from step 4" in out and "resumed" not in outputs["uninterrupted"][0], out
    losses = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in jobs}
    reference, steps = losses["uninterrupted"], int(args[args.index("--steps") + 1])
    assert len(reference) == steps and losses["killed"] == reference[4:], losses
    assert spmd.io.CheckpointManager(tmp_path / "killed").all_steps()[-1] == 6
