"""The process runtime: which process this is and how many there are, the coordinator's
key-value store, the deadlines of collectives, and the settings they read.

This is the one source of truth for the process state: ``spmd.distributed.initialize()``
(API layer) works out who this process is and records it here with :func:`set_state` /
:func:`set_store`; every layer below the API (devices, meshes, the flight recorder, the
communicators) reads it from here.  Nothing here imports any other ``spmd`` module but
``spmd.errors``.
"""
from __future__ import annotations

import atexit
import contextlib
import contextvars
import math
import dataclasses
import os
import socket
import threading
import time

from .errors import CollectiveTimeoutError, SpmdError

DEFAULT_COLLECTIVE_TIMEOUT = 300.0


# ---------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------

def float_setting(name: str, default: float, what: str = "a positive number of seconds") -> float:
    """The environment variable ``name`` as a positive finite float, ``default`` when unset or
    empty; anything else (not a number, ``nan``, ``inf``, zero, negative) raises ``SpmdError``
    naming the variable: a deadline of ``nan`` would silently turn the deadline off, and one of
    0 would fail every collective at once."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    known = _parsed.get((name, raw))         # read before every collective: parsed once
    if known is not None:
        return known
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise SpmdError(f"{name}={raw!r} is not {what}; set it to, for example, {name}={default:g}, "
                        f"or unset it (default {default:g}).")
    if len(_parsed) < 64:
        _parsed[(name, raw)] = value
    return value


_parsed: dict = {}                              # (variable, its text) -> the valid value


def int_setting(name: str, default: int, *, most: int, what: str) -> int:
    """The environment variable ``name`` as an integer in ``1..most`` (leading zeros allowed),
    ``default`` when unset or empty; anything else raises ``SpmdError`` naming the variable."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    text = raw.strip()
    if not text.isdigit() or not 1 <= int(text) <= most:
        raise SpmdError(f"{name}={raw!r}: {what} must be an integer from 1 to {most}; set it to, "
                        f"for example, {name}={default}, or unset it (default {default}).")
    return int(text)


# ---------------------------------------------------------------------------------------------
# process state
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _State:
    process_index: int = 0
    process_count: int = 1
    backend: str | None = None
    coordinator: str | None = None
    local_rank: int = 0
    launcher: str | None = None


_state = _State()
_store = None          # the coordinator's key-value store, when one is used


def state() -> _State:
    return _state


def process_index() -> int:
    """This process's index, 0 .. process_count() - 1."""
    return _state.process_index


def process_count() -> int:
    """The number of processes of the job (1 without ``initialize()``)."""
    return _state.process_count


def is_initialized() -> bool:
    return _state.process_count > 1 or _state.backend is not None


def set_state(new: _State) -> _State:
    """Record who this process is (called by ``spmd.distributed.initialize``)."""
    global _state
    _state = new
    return _state


def set_store(new) -> None:
    """Record the coordinator's store; it says goodbye (``leave()``) at exit."""
    global _store
    _store = new
    if new is not None:
        atexit.register(new.leave)


def reset() -> None:
    """Back to a single process: close the store, forget the state (``distributed.shutdown``)."""
    global _state, _store
    if _store is not None:
        atexit.unregister(_store.leave)
        _store.close()
        _store = None
    _state = _State()


def store():
    """The coordinator's key-value store (``set(key, bytes)``, ``get(key, timeout)``)."""
    if _store is None:
        raise SpmdError("no coordinator store: initialize() was called without a coordinator "
                        "(or with the mpi backend, which does not need one).")
    return _store


class Store:
    """A tiny key-value store over TCP: process 0 serves, every process sets and waits for keys.
    Enough to hand out an NCCL unique id and to meet at a barrier."""

    def __init__(self, address: str, serve: bool, num_processes: int, timeout: float | None = None):
        host, port = address.rsplit(":", 1)
        self.address = (host, int(port))
        self.timeout = timeout if timeout is not None else collective_timeout_seconds()
        self._data: dict[str, bytes] = {}
        self._cond = threading.Condition()
        self._server = None
        if serve:
            self._server = socket.create_server(("", int(port)), reuse_port=False)
            threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        with conn, conn.makefile("rwb") as f:
            for line in f:
                cmd, key, *rest = line.decode().split()
                if cmd == "SET":
                    with self._cond:
                        self._data[key] = bytes.fromhex(rest[0]) if rest else b""
                        self._cond.notify_all()
                    f.write(b"OK\n")
                else:
                    with self._cond:
                        ok = self._cond.wait_for(lambda: key in self._data, float(rest[0]))
                        value = self._data.get(key)
                    f.write(b"V " + value.hex().encode() + b"\n" if ok else b"TIMEOUT\n")
                f.flush()

    def _request(self, line: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(self.address, timeout=max(timeout, 1.0)) as s:
                    s.sendall(line.encode() + b"\n")
                    with s.makefile("rb") as f:
                        return f.readline().decode().strip()
            except (ConnectionRefusedError, socket.timeout, OSError):
                if time.monotonic() > deadline:
                    raise SpmdError(f"the coordinator {self.address[0]}:{self.address[1]} did not "
                                    f"answer within {timeout:g} s; is process 0 running and the "
                                    f"address reachable?") from None
                time.sleep(0.05)

    def set(self, key: str, value: bytes):
        self._request(f"SET {key} {value.hex()}", self.timeout)

    def get(self, key: str, timeout: float | None = None) -> bytes:
        timeout = self.timeout if timeout is None else timeout
        reply = self._request(f"GET {key} {timeout}", timeout + 5)
        kind, _, value = reply.partition(" ")
        if kind != "V":
            raise CollectiveTimeoutError(f"store.get({key!r}): no process set it within {timeout:g} s.")
        return bytes.fromhex(value)

    def barrier(self, name: str, timeout: float | None = None):
        """Wait until every process reached ``barrier(name)``."""
        self.set(f"{name}/{process_index()}", b"")
        for r in range(process_count()):
            self.get(f"{name}/{r}", timeout)

    def leave(self):
        """At exit: say so, and on process 0 (which serves the store) wait for everyone to say
        so, so that no process is left talking to a store that is gone."""
        try:
            self.set(f"_exit/{process_index()}", b"")
            if self._server is not None:
                for r in range(process_count()):
                    self.get(f"_exit/{r}")
        except SpmdError:
            pass

    def close(self):
        if self._server is not None:
            self._server.close()


# ---------------------------------------------------------------------------------------------
# deadlines
# ---------------------------------------------------------------------------------------------

_timeout_override: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "spmd_collective_timeout", default=None)


def collective_timeout_seconds() -> float:
    """The deadline of a collective started now, in seconds: ``collective_timeout(s)`` if one is
    active, else ``SPMD_COLLECTIVE_TIMEOUT``, else ``DEFAULT_COLLECTIVE_TIMEOUT``."""
    t = _timeout_override.get()
    if t is not None:
        return t
    return float_setting("SPMD_COLLECTIVE_TIMEOUT", DEFAULT_COLLECTIVE_TIMEOUT)


@contextlib.contextmanager
def collective_timeout(seconds: float):
    """``with collective_timeout(10): f(x)`` gives every collective that ``f`` runs 10 s."""
    if not seconds > 0:
        raise ValueError(f"collective_timeout({seconds!r}): the timeout must be positive seconds.")
    token = _timeout_override.set(float(seconds))
    try:
        yield
    finally:
        _timeout_override.reset(token)
