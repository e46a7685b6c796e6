"""Expert parallelism: a mixture of experts whose experts are split over an ``expert`` axis
that also splits the tokens.

Each device routes its tokens (top-k of a softmax router), keeps at most ``capacity`` tokens
per expert (the rest are dropped: they pass through the residual only), packs them into an
``(experts, capacity, d)`` buffer, and one ``all_to_all`` sends each expert's slots to the
device that holds the expert; the experts run; one ``all_to_all`` sends the results back,
where they are combined, weighted by the router's probabilities::

    slots = einsum("tec,td->ecd", dispatch, x)                  # local packing
    slots = all_to_all(slots, "expert", 0, 1, tiled=True)       # all_to_all: dispatch
    out = expert_fn(expert_params, slots)                       # local experts
    out = all_to_all(out, "expert", 1, 0, tiled=True)           # all_to_all: combine
    y = einsum("tec,ecd->td", combine, out)

The load-balancing loss (Switch Transformer) is ``E * sum_e f_e * p_e`` with ``f_e`` the
fraction of tokens whose first choice is ``e`` and ``p_e`` the mean router probability,
both over the global batch (one ``pmean`` each).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ..collectives import all_to_all, axis_size, pmean


def capacity(tokens: int, experts: int, k: int = 1, capacity_factor: float = 1.0) -> int:
    """Slots per expert per device: ``ceil(capacity_factor * k * tokens / experts)``."""
    return max(1, math.ceil(capacity_factor * k * tokens / experts))


def route(logits, k: int, slots: int):
    """``(dispatch, combine, probs, first_choice)`` for ``(tokens, experts)`` router logits:
    ``dispatch[t, e, c]`` is 1 where token ``t`` takes slot ``c`` of expert ``e`` (tokens in
    order, earlier choices first, beyond ``slots`` dropped); ``combine`` weights it by the
    router probability."""
    probs = np.exp(logits - np.max(logits, axis=-1, keepdims=True))
    probs = probs / np.sum(probs, axis=-1, keepdims=True)
    experts = logits.shape[-1]
    remaining, used = probs, np.zeros((1, experts), probs.dtype)
    dispatch = combine = 0
    first = None
    for _ in range(k):
        choice = np.argmax(remaining, axis=-1)
        onehot = (np.arange(experts)[None, :] == choice[:, None]).astype(probs.dtype)
        first = onehot if first is None else first
        position = np.cumsum(onehot, axis=0) - 1 + used          # slot index within the expert
        keep = onehot * (position < slots).astype(probs.dtype)
        slot = (np.arange(slots)[None, None, :] == position[..., None]).astype(probs.dtype)
        dispatch = dispatch + keep[..., None] * slot
        combine = combine + (keep * probs)[..., None] * slot
        used = used + np.sum(onehot, axis=0, keepdims=True)
        remaining = np.where(onehot > 0, np.full_like(remaining, -1.0), remaining)
    return dispatch, combine, probs, first


def moe(x, router_w, expert_params, expert_fn: Callable, axis_name, *, k: int = 1,
        capacity_factor: float = 1.0):
    """``(y, load_balancing_loss)`` for this device's tokens ``x`` ``(tokens, d)``.

    ``router_w`` ``(d, experts)`` is replicated; ``expert_params`` hold this device's
    ``experts / n`` experts along dim 0; ``expert_fn(params, slots)`` maps
    ``(local_experts, slots, d)`` to the same shape. Collectives: two ``all_to_all``\\ s and
    two ``pmean``\\ s of ``experts`` numbers."""
    experts = router_w.shape[-1]
    n = axis_size(axis_name)
    if experts % n:
        raise ValueError(f"moe over axis {axis_name!r}: {experts} experts do not split over the "
                         f"axis's {n} devices; use a number of experts divisible by {n}.")
    dispatch, combine, probs, first = route(x @ router_w, k,
                                            capacity(x.shape[0], experts, k, capacity_factor))
    slots = np.einsum("tec,td->ecd", dispatch, x)
    slots = all_to_all(slots, axis_name, split_axis=0, concat_axis=1, tiled=True)
    out = expert_fn(expert_params, slots)
    out = all_to_all(out, axis_name, split_axis=1, concat_axis=0, tiled=True)
    y = np.einsum("tec,ecd->td", combine, out)
    balance = experts * np.sum(pmean(np.mean(first, axis=0), axis_name)
                               * pmean(np.mean(probs, axis=0), axis_name))
    return y, balance
