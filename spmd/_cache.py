"""Bounded least-recently-used caches, the one kind every compile cache of spmd uses.

A compile cache gains an entry for each new argument shape (a traced Program, its compiled
form, an executor's plan: tens of KiB each), so a long-running process that keeps meeting new
shapes would otherwise grow without end.  Each cache keeps at most ``SPMD_CACHE_SIZE`` entries
(1024 unless that environment variable says otherwise) and drops the least recently used;
``set_default_size`` changes the size at run time (tests use it to watch entries go).

>>> c = LRU(maxsize=2)
>>> c.put("a", 1); c.put("b", 2)
>>> c.get("a")                     # "a" is now the most recently used
1
>>> c.put("c", 3)                  # so "b" goes
>>> c.get("b") is None, len(c)
(True, 2)
"""
from __future__ import annotations

import collections
import functools
import os
import threading
import weakref

ENV_VAR = "SPMD_CACHE_SIZE"
DEFAULT_SIZE = 1024

_size: int | None = None            # set_default_size's value; None: the environment's
_caches: weakref.WeakSet = weakref.WeakSet()
_caches_lock = threading.Lock()
_MISSING = object()


def _positive(n, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{what}: {n!r} is not a positive integer (the most entries a cache "
                         f"keeps).")
    return n


def default_size() -> int:
    """The most entries a cache without its own ``maxsize`` keeps: ``set_default_size``'s value,
    else ``SPMD_CACHE_SIZE``, else 1024."""
    if _size is not None:
        return _size
    raw = os.environ.get(ENV_VAR)
    if raw is None or not raw.strip():
        return DEFAULT_SIZE
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ValueError(f"{ENV_VAR}={raw!r} is not a positive integer; set it to the most entries "
                         f"each compile cache keeps (for example {ENV_VAR}={DEFAULT_SIZE}, the "
                         f"default) or unset it.")
    return int(raw)


def set_default_size(n: int | None) -> None:
    """Make every cache without its own ``maxsize`` keep at most ``n`` entries from now on (the
    ones over are dropped at once); ``None`` goes back to ``SPMD_CACHE_SIZE`` or 1024."""
    global _size
    _size = None if n is None else _positive(n, "set_default_size")
    with _caches_lock:
        caches = list(_caches)
    for c in caches:
        c._trim()


class LRU:
    """A thread-safe mapping that keeps its ``maxsize`` most recently used entries.

    ``maxsize=None`` follows :func:`default_size`.  Values are computed outside the lock: two
    threads that miss on one key at once both compute it and the later ``put`` wins, which is
    harmless for caches of pure functions."""

    def __init__(self, maxsize: int | None = None):
        self._maxsize = None if maxsize is None else _positive(maxsize, "LRU(maxsize=...)")
        self._data: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self._last = None                  # (key, value) of the most recently used entry
        with _caches_lock:
            _caches.add(self)

    @property
    def maxsize(self) -> int:
        return self._maxsize if self._maxsize is not None else default_size()

    def get(self, key, default=None):
        """The value of ``key`` (now the most recently used), or ``default``."""
        last = self._last              # a call repeats the last call's key: no hashing, no lock
        if last is not None and last[0] == key:
            return last[1]
        with self._lock:
            value = self._data.get(key, _MISSING)
            if value is _MISSING:
                return default
            self._data.move_to_end(key)
            self._last = (key, value)
            return value

    def put(self, key, value) -> None:
        """Store ``value`` under ``key``, dropping the least recently used entries over size."""
        maxsize = self.maxsize
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            self._last = None
            while len(self._data) > maxsize:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._data

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._last = None

    def _trim(self) -> None:
        maxsize = self.maxsize
        with self._lock:
            self._last = None
            while len(self._data) > maxsize:
                self._data.popitem(last=False)

    def __repr__(self):
        return f"LRU({len(self)}/{self.maxsize} entries)"


def memoize(fn=None, *, maxsize: int | None = None):
    """``functools.lru_cache`` over an :class:`LRU` (so bounded by :func:`default_size`): the
    decorated function's ``cache`` attribute is the LRU.  Arguments must be hashable."""
    if fn is None:
        return functools.partial(memoize, maxsize=maxsize)
    cache = LRU(maxsize)

    @functools.wraps(fn)
    def memoized(*args, **kwargs):
        key = (args, tuple(sorted(kwargs.items()))) if kwargs else args
        value = cache.get(key, _MISSING)
        if value is _MISSING:
            value = fn(*args, **kwargs)
            cache.put(key, value)
        return value

    memoized.cache = cache
    return memoized


def _after_fork_in_child():
    # a lock held by another thread at fork would never be released in the child
    global _caches_lock
    _caches_lock = threading.Lock()
    for c in list(_caches):
        c._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
