"""``spmd.distributed.initialize()`` against the environments of the launchers it supports, and
what a process of a multi-process job sees (devices, meshes, Arrays holding only their own
shards) — all in this one process: the state is set as process k of n, nothing is launched."""
from __future__ import annotations

import numpy as np
import pytest

import spmd
from spmd import P, distributed, flight_recorder
from spmd.errors import ShardingError, SpmdError

LAUNCHERS = [
    # (name, environment, (launcher, process_id, num_processes, local_rank, coordinator, backend))
    ("spmd-run", {"SPMD_PROCESS_ID": "2", "SPMD_NUM_PROCESSES": "4", "SPMD_LOCAL_RANK": "2",
                  "SPMD_BACKEND": "nccl", "SPMD_COORDINATOR": "127.0.0.1:4000"},
     ("spmd-run", 2, 4, 2, "127.0.0.1:4000", "nccl")),
    ("torchrun", {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                  "MASTER_ADDR": "node7", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "x"},
     ("torchrun", 3, 8, 1, "node7:29400", None)),
    ("torchrun-default-port", {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1"},
     ("torchrun", 0, 2, 0, "10.0.0.1:29500", None)),
    ("slurm", {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
               "SLURM_JOB_ID": "123456", "SLURM_STEP_NODELIST": "gpu[03-04,07],cpu1",
               "SLURM_JOB_NODELIST": "gpu[03-04,07],cpu1"},
     ("slurm", 5, 8, 1, "gpu03:23456", None)),
    ("slurm-single-host", {"SLURM_PROCID": "0", "SLURM_NPROCS": "2", "SLURM_NODELIST": "n1",
                           "SLURM_JOB_ID": "7"},
     ("slurm", 0, 2, 0, "n1:20007", None)),
    ("mpich", {"PMI_RANK": "1", "PMI_SIZE": "4", "PMI_FD": "9", "MPI_LOCALRANKID": "1",
               "MPI_LOCALNRANKS": "4", "PMI_HOSTNAME": "vm"},
     ("mpich", 1, 4, 1, None, "mpi")),
    ("openmpi", {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4",
                 "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "1",
                 "OMPI_UNIVERSE_SIZE": "4"},
     ("openmpi", 3, 4, 0, None, "mpi")),
    # srun starting an MPI program sets both: the MPI variables win (they imply the backend)
    ("slurm+pmi", {"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "PMI_RANK": "2", "PMI_SIZE": "4"},
     ("mpich", 2, 4, 0, None, "mpi")),
]

LAUNCH_VARS = {k for _, env, _ in LAUNCHERS for k in env}


@pytest.fixture
def clean_env(monkeypatch):
    for k in LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    # initialize() would install the SIGUSR1/SIGTERM handlers and excepthook in pytest itself
    monkeypatch.setattr(flight_recorder, "install_signal_handler", lambda: None)
    yield monkeypatch
    distributed.shutdown()


@pytest.mark.parametrize("name, env, want", LAUNCHERS, ids=[c[0] for c in LAUNCHERS])
def test_detect_environment(name, env, want):
    found = distributed.detect_environment(env)
    assert (found.launcher, found.process_id, found.num_processes, found.local_rank,
            found.coordinator, found.backend) == want


def test_no_launcher_means_none():
    assert distributed.detect_environment({"HOME": "/root"}) is None


def test_bad_integer_names_the_variable():
    with pytest.raises(SpmdError, match="WORLD_SIZE='four'"):
        distributed.detect_environment({"RANK": "0", "WORLD_SIZE": "four"})


@pytest.mark.parametrize("name, env, want", [c for c in LAUNCHERS if c[2][5] != "mpi"],
                         ids=[c[0] for c in LAUNCHERS if c[2][5] != "mpi"])
def test_initialize_reads_the_launcher(clean_env, name, env, want):
    for k, v in env.items():
        clean_env.setenv(k, v)
    # The coordinator store would serve on process 0 of a real job; here only the state matters.
    clean_env.setattr(distributed, "Store", lambda *a, **k: _NoStore())
    st = distributed.initialize()
    launcher, pid, n, local, coord, backend = want
    assert (st.launcher, st.process_index, st.process_count, st.local_rank, st.coordinator,
            st.backend) == (launcher, pid, n, local, coord, backend)
    assert spmd.process_index() == pid and spmd.process_count() == n
    assert [d.id for d in spmd.devices()] == list(range(n))
    assert [d.id for d in spmd.local_devices()] == [pid]
    assert [d.process_index for d in spmd.devices()] == list(range(n))


class _NoStore:
    def leave(self):
        pass

    def close(self):
        pass


def test_explicit_arguments_override_the_environment(clean_env):
    clean_env.setenv("RANK", "1")
    clean_env.setenv("WORLD_SIZE", "2")
    st = distributed.initialize(num_processes=3, process_id=2)
    assert (st.process_index, st.process_count, st.launcher) == (2, 3, "torchrun")


def test_initialize_without_a_launcher_says_how(clean_env):
    with pytest.raises(SpmdError, match="spmd-run -n N"):
        distributed.initialize()


def test_initialize_errors(clean_env):
    with pytest.raises(SpmdError, match="outside 0..1"):
        distributed.initialize(num_processes=2, process_id=2)
    with pytest.raises(SpmdError, match="use one of"):
        distributed.initialize(num_processes=2, process_id=0, backend="gloo")
    with pytest.raises(SpmdError, match="coordinator"):
        distributed.initialize(num_processes=2, process_id=0, backend="nccl")
    distributed.initialize(num_processes=2, process_id=1)
    with pytest.raises(SpmdError, match="already called"):
        distributed.initialize(num_processes=2, process_id=1)


def test_jit_without_a_backend_says_which(clean_env):
    distributed.initialize(num_processes=2, process_id=0)
    mesh = spmd.make_mesh((2,), ("i",))
    f = spmd.shard_map(lambda b: spmd.psum(b, "i"), mesh=mesh, in_specs=P("i"), out_specs=P())
    with pytest.raises(SpmdError, match="no collective backend.*backend='mpi'"):
        f(np.arange(4.0))


def test_arrays_hold_only_addressable_shards(clean_env):
    distributed.initialize(num_processes=4, process_id=1)
    mesh = spmd.make_mesh((2, 2), ("a", "b"))
    assert mesh.is_multi_process and [d.id for d in mesh.local_devices] == [1]
    host = np.arange(32.0).reshape(4, 8)
    x = spmd.device_put(host, spmd.NamedSharding(mesh, P("a", "b")))
    assert not x.is_fully_addressable and x.shape == (4, 8)
    (shard,) = x.addressable_shards
    assert shard.device.id == 1
    np.testing.assert_array_equal(shard.data, host[0:2, 4:8])
    assert list(x._blocks) == [1]                 # nothing else is stored
    with pytest.raises(ShardingError, match="process_allgather"):
        np.asarray(x)
    assert "addressable shard" in repr(x)
    # fully replicated arrays convert: every process holds the whole value
    r = spmd.device_put(host, spmd.NamedSharding(mesh, P()))
    np.testing.assert_array_equal(np.asarray(r), host)


def test_make_array_from_process_local_data(clean_env):
    distributed.initialize(num_processes=4, process_id=2)
    mesh = spmd.make_mesh((4,), ("i",))
    s = spmd.NamedSharding(mesh, P("i"))
    x = distributed.make_array_from_process_local_data(s, np.full((2, 3), 7.0))
    assert x.shape == (8, 3)
    (shard,) = x.addressable_shards
    assert shard.index[0] == slice(4, 6) and (shard.data == 7).all()
    with pytest.raises(SpmdError, match=r"shape \(3, 3\).*cover \(2, 3\)"):
        distributed.make_array_from_process_local_data(s, np.zeros((3, 3)), (8, 3))
    y = distributed.make_array_from_callback((8, 3), s, lambda idx: np.arange(24.0).reshape(8, 3)[idx])
    np.testing.assert_array_equal(y.addressable_shards[0].data, np.arange(24.0).reshape(8, 3)[4:6])


def test_single_process_helpers_need_no_backend():
    mesh = spmd.make_mesh((4,), ("i",), devices=spmd.devices()[:4])
    s = spmd.NamedSharding(mesh, P("i"))
    x = distributed.make_array_from_callback((8,), s, lambda idx: np.arange(8.0)[idx])
    np.testing.assert_array_equal(distributed.process_allgather(x), np.arange(8.0))
    np.testing.assert_array_equal(distributed.process_allgather(np.ones(2), tiled=False), np.ones((1, 2)))


def test_collective_timeout_setting(monkeypatch):
    monkeypatch.delenv("SPMD_COLLECTIVE_TIMEOUT", raising=False)
    assert distributed.collective_timeout_seconds() == 300
    monkeypatch.setenv("SPMD_COLLECTIVE_TIMEOUT", "12.5")
    assert distributed.collective_timeout_seconds() == 12.5
    with distributed.collective_timeout(3):
        assert distributed.collective_timeout_seconds() == 3
    assert distributed.collective_timeout_seconds() == 12.5
    monkeypatch.setenv("SPMD_COLLECTIVE_TIMEOUT", "soon")
    with pytest.raises(SpmdError, match="SPMD_COLLECTIVE_TIMEOUT='soon'"):
        distributed.collective_timeout_seconds()
    with pytest.raises(ValueError, match="positive"):
        with distributed.collective_timeout(0):
            pass


def test_store_set_get_and_timeout():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = distributed.Store(f"127.0.0.1:{port}", True, 1, timeout=5)
    try:
        store.set("uid", b"\x00\x01abc")
        assert store.get("uid") == b"\x00\x01abc"
        store.set("empty", b"")
        assert store.get("empty") == b""
        with pytest.raises(spmd.CollectiveTimeoutError, match="'never'"):
            store.get("never", timeout=0.2)
    finally:
        store.close()


def test_process_local_data_in_one_process_is_the_whole_array():
    mesh = spmd.make_mesh((2, 4), ("a", "b"))
    s = spmd.NamedSharding(mesh, P("b", "a"))
    host = np.arange(16.0).reshape(8, 2)
    x = distributed.make_array_from_process_local_data(s, host)
    assert x.shape == (8, 2) and x.sharding == s
    np.testing.assert_array_equal(np.asarray(x), host)
