"""Sharded checkpoints: every process writes its own shards; a later job, on any mesh and any
number of processes, reads back only the bytes each of its devices needs.

>>> import tempfile, numpy as np, spmd
>>> mesh = spmd.make_mesh((2, 4), ("data", "model"))
>>> sharding = spmd.NamedSharding(mesh, spmd.P("data", "model"))
>>> w = spmd.device_put(np.arange(32.).reshape(8, 4), sharding)
>>> path = tempfile.mkdtemp() + "/ckpt"
>>> spmd.io.save(path, {"w": w, "step": 3})
>>> back = spmd.io.load(path, {"w": spmd.NamedSharding(mesh, spmd.P("model")), "step": 0})
>>> back["step"], np.array_equal(np.asarray(back["w"]), np.asarray(w)), back["w"].sharding.spec
(3, True, P('model'))

A checkpoint is a folder in orbax's layout (without OCDBT, zarr v3), so orbax reads it too:

- ``_METADATA``: JSON; the tree (each leaf's key path and kind) and, under ``"spmd"``, each
  array's global shape, dtype, spec and mesh, and the step.
- ``<key path joined by '.'>/``: one zarr v3 array per leaf, one chunk per distinct shard (a
  replicated block is written once, by the first device that holds it), each chunk its raw
  little-endian bytes followed by a crc32c checksum (storage: tensorstore).
- ``commit_success.txt``: the commit marker.

A save is atomic: everything goes into ``<path>.partial-<token>``; each process writes its
chunks, then a file saying it is done; process 0 waits for all of them, writes the marker and
renames the folder to ``path``.  A reader only accepts a folder with the marker, so a save
killed at any point leaves the previous checkpoint as the latest; ``CheckpointManager`` deletes
such leftovers.  Every process must see the same filesystem (as with orbax).

With ``block=False`` the shards are copied to host memory on the caller's thread and written
by a background thread while training goes on; ``wait_until_finished()`` waits.

To try a resume, ``SPMD_IO_KILL_AT_STEP=k spmd-run --max-restarts 1 ...`` makes the last
process SIGKILL itself when ``CheckpointManager.save`` reaches step ``k`` in the first attempt;
the restarted job resumes from the step saved before.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
import uuid
from typing import Callable

import ml_dtypes
import numpy as np

from . import distributed, runtime, tree_util
from .array import Array, check_dtype, make_array_from_callback
from .errors import SpmdError
from .sharding import NamedSharding, PartitionSpec, as_sharding

__all__ = ["save", "load", "metadata", "wait_until_finished", "CheckpointManager",
           "CheckpointError", "ArrayMetadata", "SaveHandle"]

METADATA_FILE = "_METADATA"
COMMIT_MARKER = "commit_success.txt"
_PARTIAL = ".partial-"
_DONE_DIR = ".done"
FORMAT_VERSION = 1
# orbax's names for a leaf's kind and a key's kind, so that each side reads the other's tree
_KIND_ARRAY, _KIND_NUMPY, _KIND_SCALAR = "jax.Array", "np.ndarray", "scalar"
_KEY_SEQUENCE, _KEY_DICT = 1, 2


def _ts():
    try:
        import tensorstore  # noqa: PLC0415 (optional, the `io` extra; loads in ~1.5 s)
    except ImportError as e:
        raise ImportError(f"spmd.io reads and writes checkpoints with tensorstore, which is not "
                          f"installed ({e}): pip install 'spmd[io]'") from None
    return tensorstore


class CheckpointError(SpmdError):
    """A checkpoint is missing, partial, corrupt, or does not fit what was asked of it."""


@dataclasses.dataclass(frozen=True)
class ArrayMetadata:
    """What a checkpoint holds for one leaf, without reading its data."""
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    kind: str                                    # "jax.Array", "np.ndarray" or "scalar"
    spec: PartitionSpec | None = None            # as saved (None: not an spmd.Array)
    mesh_shape: dict | None = None               # {axis name: size} as saved

    @property
    def ndim(self) -> int:
        return len(self.shape)


# ---------------------------------------------------------------------------------------------
# names, specs and small file helpers
# ---------------------------------------------------------------------------------------------

def _leaf_name(keys) -> str:
    return tree_util.keystr(keys, simple=True, separator=".") if keys else "_root"


def _key_metadata(keys) -> list[dict]:
    return [{"key": str(k._simple()),
             "key_type": _KEY_SEQUENCE if isinstance(k, tree_util.SequenceKey) else _KEY_DICT}
            for k in keys]


def _slice_key(index, shape) -> tuple:
    return tuple(s.indices(d)[:2] for s, d in zip(index, shape))


def _chunk_shape(block_shape) -> list[int]:
    return [max(int(b), 1) for b in block_shape]      # zarr chunks cannot be empty


def _zarr_spec(folder: str, name: str, *, ocdbt=False, zarr3=True) -> dict:
    if ocdbt:
        kvstore = {"driver": "ocdbt", "base": f"file://{os.path.abspath(folder)}/",
                   "path": f"{name}/"}
    else:
        kvstore = {"driver": "file", "path": os.path.join(os.path.abspath(folder), name) + "/"}
    return {"driver": "zarr3" if zarr3 else "zarr", "kvstore": kvstore}


def _create_spec(folder, name, shape, dtype, chunk) -> dict:
    spec = _zarr_spec(folder, name)
    spec["metadata"] = {
        "shape": list(shape), "data_type": np.dtype(dtype).name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk)}},
        "chunk_key_encoding": {"name": "default"},
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]}
    # an all-zero chunk is written too: a missing chunk is then an error, not silent zeros
    spec["store_data_equal_to_fill_value"] = True
    return spec


def _write_file(path: str, data: bytes):
    """Write ``path`` whole or not at all (a temporary file, fsync, rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pause_point(name: str):
    """Test hook: ``SPMD_IO_PAUSE_AT=<name>`` stops the writer here (so that a test can kill it
    at a known phase of the save).  The phases, in order: ``metadata``, ``chunks`` (half the
    chunks written), ``done``, ``commit``, ``cleanup``."""
    if os.environ.get("SPMD_IO_PAUSE_AT") == name:
        print(f"spmd.io: paused at {name}", file=sys.stderr, flush=True)
        time.sleep(3600)


def _kill_point(step: int):
    """Test hook: ``SPMD_IO_KILL_AT_STEP=<k>`` makes the last process kill itself with SIGKILL
    when ``CheckpointManager.save`` is called for step ``k`` (the previous save has committed by
    then), on a job's first attempt only (``SPMD_RESTART_COUNT`` unset or 0), so that a job
    restarted by ``spmd-run --max-restarts`` resumes from the step saved before ``k``."""
    at = os.environ.get("SPMD_IO_KILL_AT_STEP")
    me = runtime.process_index()
    if (at is not None and int(at) == step and me == runtime.process_count() - 1
            and os.environ.get("SPMD_RESTART_COUNT", "0") in ("", "0")):
        print(f"spmd.io: SPMD_IO_KILL_AT_STEP={step}: process {me} kills itself with SIGKILL",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def _wait_for(paths: Callable[[], list[str]], what: str, deadline: float):
    """Poll until every path of ``paths()`` exists; ``what(missing)`` explains a timeout."""
    delay = 0.002
    while True:
        missing = [p for p in paths() if not os.path.exists(p)]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise CheckpointError(what(missing))
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Leaf:
    """One leaf of a save: what to record, and the blocks this process writes."""
    name: str
    keys: list
    kind: str
    shape: tuple
    dtype: np.dtype
    chunk: list
    spec: PartitionSpec | None = None
    mesh_shape: dict | None = None
    writes: list = dataclasses.field(default_factory=list)      # [(index, block)]


def _blocks_to_write(a: Array):
    """This process's share of ``a``: every distinct block once, by the first device (in mesh
    order, across all processes) that holds it.  Empty blocks have nothing to write."""
    mesh = a.sharding.mesh
    writer: dict[tuple, int] = {}
    for idx, dev in np.ndenumerate(mesh.devices):
        index = a.sharding.index_at(dict(zip(mesh.axis_names, idx)), a.shape)
        writer.setdefault(_slice_key(index, a.shape), dev.id)
    return [(s.index, s.data) for s in a.addressable_shards
            if writer[_slice_key(s.index, a.shape)] == s.device.id and s.data.size]


def _plan_leaf(keys, leaf, copy: bool) -> _Leaf:
    name = _leaf_name(keys)
    if isinstance(leaf, Array):
        if leaf.is_deleted():
            raise CheckpointError(f"spmd.io.save: the array at {name!r} was deleted or donated; "
                                  f"save the value that replaced it.")
        out = _Leaf(name, keys, _KIND_ARRAY, leaf.shape, leaf.dtype,
                    _chunk_shape(leaf.sharding.shard_shape(leaf.shape)), leaf.sharding.spec,
                    dict(leaf.sharding.mesh.shape))
        out.writes = [(i, np.array(b, copy=True) if copy else b) for i, b in _blocks_to_write(leaf)]
        return out
    if isinstance(leaf, (np.ndarray, np.generic, bool, int, float, complex)):
        host = np.array(leaf, copy=True) if copy or not isinstance(leaf, np.ndarray) else leaf
        check_dtype(host.dtype, f"spmd.io.save: the leaf at {name!r}")
        kind = _KIND_NUMPY if isinstance(leaf, np.ndarray) else _KIND_SCALAR
        out = _Leaf(name, keys, kind, host.shape, host.dtype, _chunk_shape(host.shape))
        # the same value on every process: process 0 writes it
        if runtime.process_index() == 0 and host.size:
            out.writes = [((slice(None),) * host.ndim, host)]
        return out
    raise CheckpointError(f"spmd.io.save: the leaf at {name!r} is a {type(leaf).__name__}; a "
                          f"checkpoint holds spmd.Arrays, NumPy arrays and scalars. Convert it, or "
                          f"keep it out of the saved tree.")


def _tree_json(leaves: list[_Leaf], step) -> dict:
    tree = {repr(tuple(str(k._simple()) for k in leaf.keys)): {
        "key_metadata": _key_metadata(leaf.keys),
        "value_metadata": {"value_type": leaf.kind, "skip_deserialize": False,
                           "write_shape": leaf.chunk}} for leaf in leaves}
    arrays = {leaf.name: {"shape": list(leaf.shape), "dtype": leaf.dtype.name, "kind": leaf.kind,
                          "spec": None if leaf.spec is None else [list(a) for a in leaf.spec.axes],
                          "mesh": leaf.mesh_shape} for leaf in leaves}
    return {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": True,
            "store_array_data_equal_to_fill_value": True, "custom_metadata": None,
            "spmd": {"format": FORMAT_VERSION, "step": step, "arrays": arrays}}


class SaveHandle:
    """A save in progress.  ``wait()`` returns when the checkpoint is committed (or raises what
    went wrong); ``done()`` says whether it has ended."""

    def __init__(self, path: str, run: Callable[[], None], background: bool):
        self.path, self._error = path, None
        if not background:
            run()
            self._thread = None
            return
        def body():
            try:
                run()
            except BaseException as e:       # noqa: BLE001 (handed to the thread that waits)
                self._error = e
        self._thread = threading.Thread(target=body, name=f"spmd.io.save {path}", daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def wait(self):
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            err, self._error = self._error, None
            raise err


_pending: list[SaveHandle] = []
_pending_lock = threading.Lock()


def wait_until_finished():
    """Wait for every save this process started with ``block=False``; raise the first error."""
    with _pending_lock:
        handles = list(_pending)
        _pending.clear()
    errors = []
    for h in handles:
        try:
            h.wait()
        except BaseException as e:      # noqa: BLE001 (the others are waited for first)
            errors.append(e)
    if errors:
        raise errors[0]


atexit.register(lambda: wait_until_finished())   # a script that ends mid-save still commits


def _agree_on_token() -> str:
    """A name for the partial folder, the same on every process (process 0's choice)."""
    mine = np.frombuffer(uuid.uuid4().bytes, np.uint8)
    if runtime.process_count() == 1:
        return mine.tobytes().hex()[:12]
    return distributed.process_allgather(mine[None], tiled=True)[0].tobytes().hex()[:12]


def save(path, tree, *, block: bool = True, step: int | None = None) -> SaveHandle | None:
    """Write ``tree`` (a pytree of ``spmd.Array``s, NumPy arrays and scalars) to the folder
    ``path``; call it on every process, with the same tree structure.

    Each process writes the blocks of its own devices (a replicated block once).  With
    ``block=False`` the blocks are copied to host memory now and written by a background
    thread; the returned handle's ``wait()`` (or :func:`wait_until_finished`) waits for the
    commit.  ``step`` is recorded in the metadata.  ``path`` must not exist yet.
    """
    handle = _start_save(path, tree, block, step, after_commit=None)
    return None if block else handle


def _start_save(path, tree, block: bool, step, after_commit: Callable[[], None] | None):
    _ts()                     # a missing tensorstore fails here, not in the background writer
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        raise CheckpointError(f"spmd.io.save: {path} already exists; checkpoints are never "
                              f"overwritten. Save to a new path (CheckpointManager numbers them "
                              f"by step), or delete the old one first.")
    pairs, _ = tree_util.tree_flatten_with_path(tree)
    leaves = [_plan_leaf(list(keys), leaf, copy=not block) for keys, leaf in pairs]
    names = [leaf.name for leaf in leaves]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise CheckpointError(f"spmd.io.save: key paths {dup} give the same array name once "
                              f"joined by '.'; rename the keys so each leaf has its own name.")
    tmp = f"{path}{_PARTIAL}{_agree_on_token()}"
    me, n = runtime.process_index(), runtime.process_count()
    deadline_s = runtime.collective_timeout_seconds()

    def run():
        _write_partial(tmp, leaves, me)
        _write_file(os.path.join(tmp, _DONE_DIR, f"process_{me}"), b"")
        deadline = time.monotonic() + deadline_s
        if me == 0:
            _write_file(os.path.join(tmp, METADATA_FILE),
                        json.dumps(_tree_json(leaves, step)).encode())
            done = [os.path.join(tmp, _DONE_DIR, f"process_{p}") for p in range(n)]
            _wait_for(lambda: done, lambda missing: (
                f"spmd.io.save({path!r}): process 0 waited {deadline_s:.0f} s for processes "
                f"{sorted(int(m.rsplit('_', 1)[1]) for m in missing)} to finish writing their "
                f"shards; did they call save too? (SPMD_COLLECTIVE_TIMEOUT sets the wait)"),
                deadline)
            shutil.rmtree(os.path.join(tmp, _DONE_DIR))
            _write_file(os.path.join(tmp, COMMIT_MARKER), f"step {step}\n".encode())
            _fsync_dir(tmp)
            _pause_point("commit")
            os.rename(tmp, path)                 # the commit: the folder appears complete
            _fsync_dir(os.path.dirname(path))
            _pause_point("cleanup")
            if after_commit is not None:
                after_commit()
        else:
            marker = os.path.join(path, COMMIT_MARKER)
            _wait_for(lambda: [marker], lambda _: (
                f"spmd.io.save({path!r}): process {me} waited {deadline_s:.0f} s for process 0 "
                f"to commit the checkpoint (SPMD_COLLECTIVE_TIMEOUT sets the wait)."), deadline)

    handle = SaveHandle(path, run, background=not block)
    if not block:
        with _pending_lock:
            _pending[:] = [h for h in _pending if not h.done()] + [handle]
    return handle


def _write_partial(tmp: str, leaves: list[_Leaf], me: int):
    """Create the arrays (process 0) and write this process's chunks, all concurrently."""
    ctx = _ts().Context()
    # process 0 writes each array's zarr.json; the others only add chunks to it
    mode = {"create": True} if me == 0 else {"open": True, "assume_metadata": True}
    opened = [_ts().open(_create_spec(tmp, leaf.name, leaf.shape, leaf.dtype, leaf.chunk),
                         context=ctx, **mode) for leaf in leaves]
    stores = [f.result() for f in opened]
    _pause_point("metadata")
    writes = [store[index].write(block) for store, leaf in zip(stores, leaves)
              for index, block in leaf.writes]
    for i, w in enumerate(writes):
        w.result()
        if i == len(writes) // 2:
            _pause_point("chunks")
    _pause_point("done")


# ---------------------------------------------------------------------------------------------
# metadata and load
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Checkpoint:
    path: str
    raw: dict
    entries: dict[str, dict]                    # name -> {"keys": [...], "kind": ...}

    @property
    def is_spmd(self) -> bool:
        return "spmd" in self.raw

    def spec(self, name) -> dict:
        return _zarr_spec(self.path, name, ocdbt=bool(self.raw.get("use_ocdbt")),
                          zarr3=bool(self.raw.get("use_zarr3", True)))


def _open_checkpoint(path, what: str) -> _Checkpoint:
    path = os.path.abspath(os.fspath(path))
    meta_file = os.path.join(path, METADATA_FILE)
    if not os.path.exists(meta_file):
        parent, base = os.path.split(path)
        partial = [p for p in os.listdir(parent) if p.startswith(base + _PARTIAL)] \
            if os.path.isdir(parent) else []
        hint = (f" ({len(partial)} unfinished save(s) of it exist: a save was interrupted before "
                f"its commit)" if partial else "")
        raise CheckpointError(f"{what}: {path} is not a checkpoint (no {METADATA_FILE}){hint}.")
    with open(meta_file) as f:
        raw = json.load(f)
    if "spmd" in raw and not os.path.exists(os.path.join(path, COMMIT_MARKER)):
        raise CheckpointError(f"{what}: {path} has no commit marker ({COMMIT_MARKER}): its save "
                              f"did not finish; load an earlier checkpoint.")
    entries = {}
    for item in raw["tree_metadata"].values():
        keys = item["key_metadata"]
        name = ".".join(k["key"] for k in keys) if keys else "_root"
        entries[name] = {"keys": keys, "kind": item["value_metadata"]["value_type"]}
    return _Checkpoint(path, raw, entries)


def _array_metadata(ck: _Checkpoint, name: str) -> ArrayMetadata:
    kind = ck.entries[name]["kind"]
    if ck.is_spmd:
        a = ck.raw["spmd"]["arrays"][name]
        spec = None if a["spec"] is None else PartitionSpec(
            *[tuple(x) if len(x) > 1 else (x[0] if x else None) for x in a["spec"]])
        return ArrayMetadata(name, tuple(a["shape"]), np.dtype(_dtype(a["dtype"])), kind, spec,
                             a["mesh"])
    store = _ts().open(ck.spec(name), open=True).result()
    return ArrayMetadata(name, tuple(store.shape), np.dtype(store.dtype.numpy_dtype), kind)


def _dtype(name: str):
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def metadata(path):
    """The tree a checkpoint holds, with an :class:`ArrayMetadata` (shape, dtype, spec as
    saved) at each leaf, without reading any array data.  Dicts and lists as saved."""
    ck = _open_checkpoint(path, "spmd.io.metadata")
    root: dict = {}
    for name, entry in ck.entries.items():
        keys = entry["keys"]
        if not keys:
            return _array_metadata(ck, name)
        node = root
        for k in keys[:-1]:
            node = node.setdefault(k["key"], {})
        node[keys[-1]["key"]] = _array_metadata(ck, name)
    return _rebuild(root, ck)


def _rebuild(root: dict, ck: _Checkpoint):
    """Turn the dict levels whose keys are sequence keys back into lists."""
    seq: set[tuple] = set()
    for entry in ck.entries.values():
        for i, k in enumerate(entry["keys"]):
            if k["key_type"] == _KEY_SEQUENCE:
                seq.add(tuple(x["key"] for x in entry["keys"][:i]))

    def walk(node, prefix):
        if not isinstance(node, dict):
            return node
        kids = {k: walk(v, prefix + (k,)) for k, v in node.items()}
        if prefix in seq:
            return [kids[k] for k in sorted(kids, key=int)]
        return kids
    return walk(root, ())


def _is_target_leaf(x) -> bool:
    return isinstance(x, (NamedSharding, PartitionSpec)) or (
        hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "sharding"))


def _target_sharding(leaf, name: str, saved: ArrayMetadata):
    """(sharding, shape, dtype) a target leaf asks for, checked against what was saved."""
    if isinstance(leaf, (NamedSharding, PartitionSpec)):
        sharding = as_sharding(leaf, what=f"spmd.io.load: the target at {name!r}")
        return sharding, saved.shape, saved.dtype
    sharding = leaf.sharding
    if not isinstance(sharding, NamedSharding):
        raise CheckpointError(f"spmd.io.load: the target at {name!r} has sharding {sharding!r}; "
                              f"give an spmd.NamedSharding (or a ShapeDtypeStruct with one).")
    shape = tuple(leaf.shape)
    if shape != saved.shape:
        raise CheckpointError(f"spmd.io.load: the target at {name!r} has shape {shape}, but the "
                              f"checkpoint holds {saved.shape}; give a target of that shape (or "
                              f"just a sharding, which takes the saved shape).")
    return sharding, shape, np.dtype(leaf.dtype)


def load(path, target):
    """Read a checkpoint laid out as ``target`` asks: a pytree whose leaves are
    ``NamedSharding``s (or ``P``s under ``set_mesh``), ``ShapeDtypeStruct``s or Arrays (their
    sharding, shape and dtype are taken), NumPy arrays (read whole, on the host) or scalars
    (read as saved).  Returns the tree with Arrays laid out as asked, on any mesh and any
    number of processes; each process reads only the chunks its devices' blocks overlap.
    Reads a checkpoint written by orbax as well.
    """
    ck = _open_checkpoint(path, "spmd.io.load")
    pairs, treedef = tree_util.tree_flatten_with_path(target, is_leaf=_is_target_leaf)
    ctx = _ts().Context()
    plans = []
    for keys, leaf in pairs:
        name = _leaf_name(keys)
        if name not in ck.entries:
            raise CheckpointError(f"spmd.io.load: the target has a leaf at {name!r}, which "
                                  f"{ck.path} does not hold; it holds {sorted(ck.entries)[:20]}.")
        plans.append((name, leaf, _ts().open(ck.spec(name), open=True, context=ctx)))
    finishers = []                      # every read is started before the first is waited for
    for name, leaf, opened in plans:
        store = opened.result()
        saved = ArrayMetadata(name, tuple(store.shape), np.dtype(store.dtype.numpy_dtype),
                              ck.entries[name]["kind"])
        if _is_target_leaf(leaf):
            finishers.append(_read_array(store, *_target_sharding(leaf, name, saved), ck, name))
        else:
            whole = _read_into(store, ck, name)
            as_scalar = not isinstance(leaf, np.ndarray) and saved.kind == _KIND_SCALAR
            finishers.append(lambda whole=whole, as_scalar=as_scalar: (
                whole().item() if as_scalar else whole()))
    out = [finish() for finish in finishers]
    return tree_util.tree_unflatten(treedef, out)


def _read_array(store, sharding, shape, dtype, ck: _Checkpoint, name: str):
    """Start reading the blocks of this process's devices (each distinct block once); returns
    what waits and builds the Array.  Within one process the whole array is read at once, each
    chunk once, and the Array views it."""
    mesh = sharding._concrete_mesh(f"spmd.io.load of {name!r}")
    if sharding.is_fully_addressable:
        whole = _read_into(store, ck, name)
        return lambda: Array.from_host(whole().astype(dtype, copy=False), sharding)
    local = {d.id for d in mesh.local_devices}
    reads = {}
    for idx, dev in np.ndenumerate(mesh.devices):
        if dev.id in local:
            index = sharding.index_at(dict(zip(mesh.axis_names, idx)), shape)
            if _slice_key(index, shape) not in reads:
                reads[_slice_key(index, shape)] = _read_into(store[index], ck, name)

    def finish():
        blocks = {k: read().astype(dtype, copy=False) for k, read in reads.items()}
        return make_array_from_callback(shape, sharding,
                                        lambda index: blocks[_slice_key(index, shape)])
    return finish


def _read_into(source, ck: _Checkpoint, name: str) -> Callable[[], np.ndarray]:
    """Start reading ``source`` (a TensorStore) into a new NumPy array; returns what waits for
    it and gives the array.  NumPy allocates the buffer (asking for huge pages, where the array
    ``source.read()`` allocates takes a page fault per 4 KiB) and tensorstore copies each chunk
    into its place: a third of the page faults of ``source.read()`` on a 1 GiB load."""
    out = np.empty(source.shape, source.dtype.numpy_dtype)
    future = _ts().array(out, copy=False, write=True).write(source)

    def wait():
        _result(future, ck, name)
        return out
    return wait


def _result(future, ck: _Checkpoint, name: str):
    try:
        return future.result()
    except ValueError as e:
        text = str(e)
        file = re.search(r'"([^"]*)"', text)            # tensorstore names the file it read
        coords = re.search(r"/c/([\d/]+)$", file.group(1)) if file else None
        chunk = (f"chunk ({coords.group(1).replace('/', ',')}) [{file.group(1)}]" if coords
                 else f"[{file.group(1) if file else '?'}]")
        kind = ("is corrupt (its crc32c checksum does not match)" if "Digest mismatch" in text
                else "cannot be read")
        raise CheckpointError(f"checkpoint {ck.path}: array {name!r}, {chunk} {kind}: {text}. "
                              f"Restore from an earlier checkpoint.") from None


# ---------------------------------------------------------------------------------------------
# the manager
# ---------------------------------------------------------------------------------------------

class CheckpointManager:
    """Numbered checkpoints in one folder: ``dir/<step>``.

    ``save(step, tree)`` saves in the background every ``save_interval_steps`` steps (it first
    waits for the previous save); after each commit process 0 keeps the newest
    ``max_to_keep`` and deletes unfinished saves left by a killed job.  ``latest_step()``,
    ``all_steps()``, ``restore(step, target)``, ``wait_until_finished()``.
    """

    def __init__(self, directory, *, max_to_keep: int | None = None, save_interval_steps: int = 1):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"CheckpointManager(max_to_keep={max_to_keep}): keep at least 1, or "
                             f"None to keep all.")
        if save_interval_steps < 1:
            raise ValueError(f"CheckpointManager(save_interval_steps={save_interval_steps}): "
                             f"must be at least 1.")
        _ts()                 # a missing tensorstore fails before the folder is made
        self.directory = os.path.abspath(os.fspath(directory))
        self.max_to_keep, self.save_interval_steps = max_to_keep, save_interval_steps
        self._handle: SaveHandle | None = None
        os.makedirs(self.directory, exist_ok=True)
        if runtime.process_index() == 0:
            self._remove_partial()

    def all_steps(self) -> list[int]:
        return sorted(int(p) for p in os.listdir(self.directory) if p.isdigit()
                      and os.path.exists(os.path.join(self.directory, p, COMMIT_MARKER)))

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        return step % self.save_interval_steps == 0 and step not in self.all_steps()

    def save(self, step: int, tree, *, force: bool = False) -> bool:
        """Start saving ``tree`` as step ``step``; False when the interval says to skip it."""
        self.wait_until_finished()
        _kill_point(step)
        if not force and not self.should_save(step):
            return False
        keep = runtime.process_index() == 0
        self._handle = _start_save(os.path.join(self.directory, str(step)), tree, False, step,
                                   after_commit=self._prune if keep else None)
        return True

    def restore(self, step: int | None, target):
        """Load step ``step`` (None: the latest) laid out as ``target`` (see :func:`load`)."""
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"CheckpointManager.restore: {self.directory} holds no "
                                      f"committed checkpoint yet.")
        return load(os.path.join(self.directory, str(step)), target)

    def wait_until_finished(self):
        if self._handle is not None:
            handle, self._handle = self._handle, None
            handle.wait()

    def close(self):
        self.wait_until_finished()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _prune(self):
        if self.max_to_keep is not None:
            for step in self.all_steps()[:-self.max_to_keep]:
                shutil.rmtree(os.path.join(self.directory, str(step)), ignore_errors=True)
        self._remove_partial(older_than_newest=True)

    def _remove_partial(self, older_than_newest: bool = False):
        """Delete unfinished saves; after a commit only those of steps before the newest (a
        partial folder of a later step could belong to a save still running)."""
        newest = self.latest_step() if older_than_newest else None
        for p in os.listdir(self.directory):
            step = p.split(_PARTIAL)[0]
            if _PARTIAL in p and step.isdigit() and (newest is None or int(step) <= newest):
                shutil.rmtree(os.path.join(self.directory, p), ignore_errors=True)
