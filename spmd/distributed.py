"""Multi-process state.  A single process is the default: process 0 of 1."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class _State:
    process_index: int = 0
    process_count: int = 1
    backend: str | None = None


_state = _State()


def state() -> _State:
    return _state


def process_index() -> int:
    return _state.process_index


def process_count() -> int:
    return _state.process_count
