"""Functional optimizers: optax's ``GradientTransformation`` names, signatures and results.

An optimizer is a pair of pure functions over pytrees: ``init(params) -> state`` and
``update(grads, state, params=None) -> (updates, state)``; ``apply_updates(params, updates)``
adds the updates. Every piece of state that belongs to a parameter is laid out like that
parameter (same shape, and under ``jit`` or ``shard_map`` the same sharding), so optimizer
state sharded like FSDP parameters costs ``1/n`` of the memory per device and needs no
collective. Small transformations compose with ``chain``; ``sgd``, ``adam``, ``adamw``,
``lion`` and ``adafactor`` are such chains, as in optax, and give optax's updates.

>>> import numpy as np, spmd.optim as optim
>>> tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adam(optim.warmup_cosine_decay_schedule(
...     0.0, 1e-2, warmup_steps=2, decay_steps=10)))
>>> params = {"w": np.ones(3, np.float32)}
>>> state = tx.init(params)
>>> updates, state = tx.update({"w": np.full(3, 0.5, np.float32)}, state, params)
>>> optim.apply_updates(params, updates)["w"].tolist()      # warm-up starts at 0
[1.0, 1.0, 1.0]

Beyond optax: ``master_weights`` keeps float32 master copies of bfloat16 parameters, and
``DynamicLossScale`` scales a low-precision loss and skips steps whose gradients overflow.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import numpy as np

from .tree_util import register_dataclass, tree_leaves, tree_map, tree_structure

Schedule = Callable[[Any], Any]


class GradientTransformation(NamedTuple):
    """``init(params) -> state`` and ``update(updates, state, params=None) -> (updates, state)``."""
    init: Callable
    update: Callable


class EmptyState(NamedTuple):
    """The state of a transformation that keeps none."""


class ScaleByScheduleState(NamedTuple):
    count: Any


class TraceState(NamedTuple):
    trace: Any


class ScaleByAdamState(NamedTuple):
    count: Any
    mu: Any
    nu: Any


class ScaleByLionState(NamedTuple):
    count: Any
    mu: Any


class EmaState(NamedTuple):
    count: Any
    ema: Any


class FactoredState(NamedTuple):
    count: Any
    v_row: Any
    v_col: Any
    v: Any


class MasterWeightsState(NamedTuple):
    master: Any       # float32 copies of the parameters
    inner: Any        # the wrapped optimizer's state, over the master copies


def _count0():
    return np.zeros((), np.int32)


def _step(count):
    """The count as float32, as optax's schedules see it (JAX's weak types keep float32)."""
    return count.astype(np.float32) if hasattr(count, "astype") else np.float32(count)


def _increment(count):
    """``count + 1`` that stays at int32's maximum instead of wrapping around."""
    return np.where(count < np.iinfo(np.int32).max, count + np.int32(1), count)


def _empty_init(params):
    return EmptyState()


def _cast(x, dtype):
    return x if dtype is None else x.astype(dtype)


def _zeros_like(p, dtype=None):
    return np.zeros_like(p, dtype=dtype if dtype is not None else p.dtype)


# ---- schedules: count -> value, traceable (the count may be a traced int32) -----------------

def constant_schedule(value) -> Schedule:
    """The same ``value`` at every step."""
    return lambda count: value


def polynomial_schedule(init_value, end_value, power, transition_steps: int,
                        transition_begin: int = 0) -> Schedule:
    """From ``init_value`` to ``end_value`` over ``transition_steps`` after ``transition_begin``,
    along ``(1 - t/T) ** power``; constant before and after."""
    if transition_steps <= 0:
        return constant_schedule(init_value)
    transition_begin = max(transition_begin, 0)

    def schedule(count):
        t = np.clip(_step(count) - np.float32(transition_begin), np.float32(0),
                    np.float32(transition_steps))
        frac = np.float32(1) - t / np.float32(transition_steps)
        return np.float32(init_value - end_value) * frac ** np.float32(power) \
            + np.float32(end_value)
    return schedule


def linear_schedule(init_value, end_value, transition_steps: int,
                    transition_begin: int = 0) -> Schedule:
    """Linear from ``init_value`` to ``end_value`` over ``transition_steps``."""
    return polynomial_schedule(init_value, end_value, 1, transition_steps, transition_begin)


def cosine_decay_schedule(init_value, decay_steps: int, alpha=0.0, exponent=1.0) -> Schedule:
    """``init_value * ((1 - alpha) * (0.5 (1 + cos(pi t / T))) ** exponent + alpha)``, t ≤ T."""
    if not decay_steps > 0:
        raise ValueError(f"cosine_decay_schedule: decay_steps must be positive, got {decay_steps}")

    def schedule(count):
        t = np.minimum(_step(count), np.float32(decay_steps))
        cosine = np.float32(0.5) * (np.float32(1) + np.cos(np.float32(np.pi) * t
                                                           / np.float32(decay_steps)))
        return np.float32(init_value) * (np.float32(1 - alpha) * cosine ** np.float32(exponent)
                                         + np.float32(alpha))
    return schedule


def join_schedules(schedules, boundaries) -> Schedule:
    """``schedules[i]`` from ``boundaries[i-1]`` on, each counting from its own boundary."""
    def schedule(count):
        value = schedules[0](count)
        for boundary, later in zip(boundaries, schedules[1:]):
            value = np.where(count < boundary, value, later(count - boundary))
        return value
    return schedule


def warmup_cosine_decay_schedule(init_value, peak_value, warmup_steps: int, decay_steps: int,
                                 end_value=0.0, exponent=1.0) -> Schedule:
    """Linear warm-up from ``init_value`` to ``peak_value`` over ``warmup_steps``, then cosine
    decay to ``end_value`` at ``decay_steps`` (counted from step 0, warm-up included)."""
    alpha = 0.0 if peak_value == 0.0 else end_value / peak_value
    return join_schedules([linear_schedule(init_value, peak_value, warmup_steps),
                           cosine_decay_schedule(peak_value, decay_steps - warmup_steps, alpha,
                                                 exponent)], [warmup_steps])


# ---- transformations -------------------------------------------------------------------------

def identity() -> GradientTransformation:
    """Leaves the updates as they are."""
    return GradientTransformation(_empty_init, lambda u, state, params=None: (u, state))


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Applies ``transforms`` in order; the state is the tuple of their states."""
    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(updates, state, params=None):
        if len(state) != len(transforms):
            raise ValueError(f"chain: the state holds {len(state)} entries for "
                             f"{len(transforms)} transformations; build it with this chain's init")
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params)
            new_state.append(s)
        return updates, tuple(new_state)
    return GradientTransformation(init, update)


def scale(step_size) -> GradientTransformation:
    """Multiplies the updates by ``step_size``."""
    def update(updates, state, params=None):
        return tree_map(lambda g: g * np.asarray(step_size, g.dtype), updates), state
    return GradientTransformation(_empty_init, update)


def scale_by_schedule(step_size_fn: Schedule) -> GradientTransformation:
    """Multiplies the updates by ``step_size_fn(count)``; the count starts at 0."""
    def update(updates, state, params=None):
        step = step_size_fn(state.count)
        step = step if hasattr(step, "astype") else np.asarray(step)
        updates = tree_map(lambda g: g * step.astype(g.dtype), updates)
        return updates, ScaleByScheduleState(_increment(state.count))
    return GradientTransformation(lambda params: ScaleByScheduleState(_count0()), update)


def scale_by_learning_rate(learning_rate, *, flip_sign: bool = True) -> GradientTransformation:
    """Scales by ``-learning_rate`` (a number or a schedule) so updates descend."""
    sign = -1.0 if flip_sign else 1.0
    if callable(learning_rate):
        return scale_by_schedule(lambda count: sign * learning_rate(count))
    return scale(sign * learning_rate)


def trace(decay, nesterov: bool = False, accumulator_dtype=None) -> GradientTransformation:
    """Momentum: ``t = g + decay * t``; the update is ``t`` (or ``g + decay * t``, Nesterov)."""
    def init(params):
        return TraceState(tree_map(lambda p: _zeros_like(p, accumulator_dtype), params))

    def update(updates, state, params=None):
        new = tree_map(lambda g, t: g + decay * t, updates, state.trace)
        out = tree_map(lambda g, t: g + decay * t, updates, new) if nesterov else new
        return out, TraceState(tree_map(lambda t: _cast(t, accumulator_dtype), new))
    return GradientTransformation(init, update)


def _moment(grads, moment, decay, order):
    return tree_map(lambda g, m: (1 - decay) * (g ** order) + decay * m, grads, moment)


def _debias(moment, decay, count):
    return tree_map(lambda m: m / (np.float32(1) - np.float32(decay) ** _step(count))
                    .astype(m.dtype), moment)


def scale_by_adam(b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None, *,
                  nesterov: bool = False) -> GradientTransformation:
    """Adam's rescaling: debiased first moment over the root of the debiased second."""
    def init(params):
        return ScaleByAdamState(_count0(), tree_map(lambda p: _zeros_like(p, mu_dtype), params),
                                tree_map(_zeros_like, params))

    def update(updates, state, params=None):
        mu = _moment(updates, state.mu, b1, 1)
        nu = _moment(updates, state.nu, b2, 2)
        count = _increment(state.count)
        if nesterov:
            mu_hat = tree_map(lambda m, g: b1 * m + (1 - b1) * g,
                              _debias(mu, b1, _increment(count)), _debias(updates, b1, count))
        else:
            mu_hat = _debias(mu, b1, count)
        nu_hat = _debias(nu, b2, count)
        out = tree_map(lambda m, v: m / (np.sqrt(v + eps_root) + eps), mu_hat, nu_hat)
        return out, ScaleByAdamState(count, tree_map(lambda m: _cast(m, mu_dtype), mu), nu)
    return GradientTransformation(init, update)


def scale_by_lion(b1=0.9, b2=0.99, mu_dtype=None) -> GradientTransformation:
    """Lion's rescaling: the sign of an interpolation of gradient and momentum."""
    def init(params):
        return ScaleByLionState(_count0(), tree_map(lambda p: _zeros_like(p, mu_dtype), params))

    def update(updates, state, params=None):
        out = tree_map(lambda g, m: np.sign((1 - b1) * g + b1 * m), updates, state.mu)
        mu = tree_map(lambda g, m: _cast((1 - b2) * g + b2 * m, mu_dtype), updates, state.mu)
        return out, ScaleByLionState(_increment(state.count), mu)
    return GradientTransformation(init, update)


def add_decayed_weights(weight_decay=0.0, mask=None) -> GradientTransformation:
    """Adds ``weight_decay * param`` to each update (where ``mask``, a tree of bools or a
    function of the params giving one, is true)."""
    def update(updates, state, params=None):
        if params is None:
            raise ValueError("add_decayed_weights needs the parameters: call "
                             "update(grads, state, params)")
        keep = mask(params) if callable(mask) else mask
        if keep is None:
            return tree_map(lambda g, p: g + weight_decay * p, updates, params), state
        return tree_map(lambda g, p, m: g + weight_decay * p if m else g,
                        updates, params, keep), state
    return GradientTransformation(_empty_init, update)


def global_norm(updates):
    """The 2-norm of all leaves together."""
    return np.sqrt(sum(np.sum(np.square(g)) for g in tree_leaves(updates)))


def clip_by_global_norm(max_norm) -> GradientTransformation:
    """Scales all updates by ``max_norm / global_norm`` when the global norm exceeds it.

    Under ``jit`` with sharded gradients the norm's sum is one small all-reduce."""
    def update(updates, state, params=None):
        norm = global_norm(updates)
        factor = np.where(norm < max_norm, np.ones_like(norm), max_norm / norm)
        return tree_map(lambda g: g * factor.astype(g.dtype), updates), state
    return GradientTransformation(_empty_init, update)


def clip_by_block_rms(threshold) -> GradientTransformation:
    """Scales each leaf down so that its root mean square is at most ``threshold``."""
    def update(updates, state, params=None):
        return tree_map(lambda g: g / np.maximum(1.0, np.sqrt(np.mean(np.square(g))) / threshold),
                        updates), state
    return GradientTransformation(_empty_init, update)


def scale_by_param_block_rms(min_scale=1e-3) -> GradientTransformation:
    """Multiplies each update by its parameter's root mean square (at least ``min_scale``)."""
    def update(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_param_block_rms needs the parameters: call "
                             "update(grads, state, params)")
        return tree_map(lambda g, p: g * np.maximum(np.sqrt(np.mean(np.square(p))), min_scale)
                        .astype(g.dtype), updates, params), state
    return GradientTransformation(_empty_init, update)


def ema(decay, debias: bool = True, accumulator_dtype=None) -> GradientTransformation:
    """An exponential moving average of the updates (debiased by default)."""
    def init(params):
        return EmaState(_count0(), tree_map(lambda p: _zeros_like(p, accumulator_dtype), params))

    def update(updates, state, params=None):
        new = _moment(updates, state.ema, decay, 1)
        count = _increment(state.count)
        out = _debias(new, decay, count) if debias else new
        return out, EmaState(count, tree_map(lambda m: _cast(m, accumulator_dtype), new))
    return GradientTransformation(init, update)


def _factored_dims(shape, factored, min_dim_size_to_factor):
    """The two largest dims (second largest first), if both are at least the minimum size."""
    if not factored or len(shape) < 2:
        return None
    order = np.argsort(shape)
    if shape[order[-2]] < min_dim_size_to_factor:
        return None
    return int(order[-2]), int(order[-1])


def scale_by_factored_rms(factored: bool = True, decay_rate=0.8, step_offset=0,
                          min_dim_size_to_factor: int = 128,
                          epsilon=1e-30) -> GradientTransformation:
    """Adafactor's rescaling: the second moment of a matrix kept as row and column means."""
    def init(params):
        def one(p):
            dims = _factored_dims(p.shape, factored, min_dim_size_to_factor)
            z = np.zeros((1,), p.dtype)
            if dims is None:
                return z, z, _zeros_like(p)
            d1, d0 = dims
            return (np.zeros(tuple(s for i, s in enumerate(p.shape) if i != d0), p.dtype),
                    np.zeros(tuple(s for i, s in enumerate(p.shape) if i != d1), p.dtype), z)
        return FactoredState(_count0(), *_map_unzip(one, 3, params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_factored_rms needs the parameters: call "
                             "update(grads, state, params)")
        t = _step(state.count - step_offset) + np.float32(1)
        rate = np.float32(1) - t ** np.float32(-decay_rate)

        def one(g, v_row, v_col, v, p):
            dims = _factored_dims(p.shape, factored, min_dim_size_to_factor)
            g2 = np.square(g) + epsilon
            z = np.zeros((1,), p.dtype)      # the unused entries, shaped as optax has them
            if dims is None:
                new_v = (rate * v + (1 - rate) * g2).astype(p.dtype)
                return g * new_v ** -0.5, z, z, new_v
            d1, d0 = dims
            row = (rate * v_row + (1 - rate) * np.mean(g2, axis=d0)).astype(p.dtype)
            col = (rate * v_col + (1 - rate) * np.mean(g2, axis=d1)).astype(p.dtype)
            mean_row = np.mean(row, axis=d1 - 1 if d1 > d0 else d1, keepdims=True)
            row_factor = (row / mean_row) ** -0.5
            out = g * np.expand_dims(row_factor, d0) * np.expand_dims(col ** -0.5, d1)
            return out, row, col, z
        out, *stats = _map_unzip(one, 4, updates, state.v_row, state.v_col, state.v, params)
        return out, FactoredState(_increment(state.count), *stats)
    return GradientTransformation(init, update)


def _map_unzip(fn, n_out, tree, *rest):
    """``fn`` over the leaves of ``tree`` (and of ``rest``, shaped alike), returning ``n_out``
    values per leaf: ``n_out`` trees shaped like ``tree``."""
    treedef = tree_structure(tree)
    results = [fn(*leaves) for leaves in zip(tree_leaves(tree), *map(tree_leaves, rest))]
    return [treedef.unflatten([r[i] for r in results]) for i in range(n_out)]


# ---- the optimizers --------------------------------------------------------------------------

def sgd(learning_rate, momentum=None, nesterov: bool = False,
        accumulator_dtype=None) -> GradientTransformation:
    """Stochastic gradient descent, with optional (Nesterov) momentum."""
    return chain(identity() if momentum is None else
                 trace(momentum, nesterov, accumulator_dtype),
                 scale_by_learning_rate(learning_rate))


def adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None, *,
         nesterov: bool = False) -> GradientTransformation:
    """Adam (Kingma & Ba, 2014); ``nesterov=True`` is NAdam."""
    return chain(scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov),
                 scale_by_learning_rate(learning_rate))


def adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None,
          weight_decay=1e-4, mask=None, *, nesterov: bool = False) -> GradientTransformation:
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019)."""
    return chain(scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov),
                 add_decayed_weights(weight_decay, mask), scale_by_learning_rate(learning_rate))


def lion(learning_rate, b1=0.9, b2=0.99, mu_dtype=None, weight_decay=1e-3,
         mask=None) -> GradientTransformation:
    """Lion (Chen et al., 2023): sign updates with decoupled weight decay."""
    return chain(scale_by_lion(b1, b2, mu_dtype), add_decayed_weights(weight_decay, mask),
                 scale_by_learning_rate(learning_rate))


def adafactor(learning_rate=None, min_dim_size_to_factor: int = 128, decay_rate=0.8,
              decay_offset: int = 0, multiply_by_parameter_scale: bool = True,
              clipping_threshold=1.0, momentum=None, dtype_momentum=np.float32,
              weight_decay_rate=None, eps=1e-30, factored: bool = True,
              weight_decay_mask=None) -> GradientTransformation:
    """Adafactor (Shazeer & Stern, 2018): factored second moments, relative step sizes."""
    parts = [scale_by_factored_rms(factored, decay_rate, decay_offset, min_dim_size_to_factor,
                                   eps)]
    if clipping_threshold is not None:
        parts.append(clip_by_block_rms(clipping_threshold))
    if learning_rate is not None:
        parts.append(scale_by_learning_rate(learning_rate, flip_sign=False))
    if multiply_by_parameter_scale:
        parts.append(scale_by_param_block_rms())
    if momentum is not None:
        parts.append(ema(momentum, debias=False, accumulator_dtype=dtype_momentum))
    if weight_decay_rate is not None:
        parts.append(add_decayed_weights(weight_decay_rate, weight_decay_mask))
    parts.append(scale(-1))
    return chain(*parts)


def apply_updates(params, updates):
    """``params + updates``, each result in its parameter's dtype."""
    return tree_map(lambda p, u: (p + u).astype(p.dtype), params, updates)


# ---- mixed precision -------------------------------------------------------------------------

def master_weights(inner: GradientTransformation,
                   master_dtype=np.float32) -> GradientTransformation:
    """Runs ``inner`` on float32 master copies of low-precision (bfloat16) parameters.

    The state holds the master copies; ``update`` returns, in float32, the difference between
    the new master copies rounded to the parameters' dtype and the parameters, so that
    ``apply_updates(params, updates)`` gives exactly that rounding: the parameters stay the
    rounded master copies, while the small steps accumulate in float32.
    """
    def init(params):
        master = tree_map(lambda p: p.astype(master_dtype), params)
        return MasterWeightsState(master, inner.init(master))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("master_weights needs the parameters: call update(grads, state, "
                             "params)")
        grads = tree_map(lambda g: g.astype(master_dtype), updates)
        steps, inner_state = inner.update(grads, state.inner, state.master)
        master = apply_updates(state.master, steps)
        out = tree_map(lambda m, p: m.astype(p.dtype).astype(master_dtype)
                       - p.astype(master_dtype), master, params)
        return out, MasterWeightsState(master, inner_state)
    return GradientTransformation(init, update)


def all_finite(tree):
    """Whether every element of every leaf is finite (a traced bool under ``jit``)."""
    return np.all(np.stack([np.all(np.isfinite(x)) for x in tree_leaves(tree)]))


@register_dataclass
@dataclasses.dataclass(frozen=True)
class DynamicLossScale:
    """A loss scale for low-precision gradients: multiply the loss by it (``scale``), divide the
    gradients by it (``unscale``), then ``adjust`` it: halved (``factor``) when the gradients
    overflowed, doubled after ``period`` finite steps in a row. A pytree, so it goes through
    ``jit``; skip the optimizer step when ``all_finite(grads)`` is false (``select_tree``).

    >>> import numpy as np, spmd.optim as optim
    >>> ls = optim.DynamicLossScale(np.float32(2.0 ** 15))
    >>> ls.adjust(np.bool_(False)).loss_scale.item()
    16384.0
    """
    loss_scale: Any
    counter: Any = dataclasses.field(default_factory=lambda: np.zeros((), np.int32))
    period: int = dataclasses.field(default=2000, metadata=dict(static=True))
    factor: int = dataclasses.field(default=2, metadata=dict(static=True))
    min_loss_scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))

    def scale(self, tree):
        return tree_map(lambda x: x * self.loss_scale.astype(x.dtype), tree)

    def unscale(self, tree):
        return tree_map(lambda x: x * (np.float32(1) / self.loss_scale).astype(x.dtype), tree)

    def adjust(self, grads_finite) -> "DynamicLossScale":
        one = np.ones((), np.float32)
        grown = self.counter == self.period - 1
        loss_scale = np.where(grads_finite,
                              np.where(grown, self.loss_scale * (one * self.factor),
                                       self.loss_scale),
                              np.maximum(np.float32(self.min_loss_scale),
                                         self.loss_scale / (one * self.factor)))
        counter = np.where(grads_finite & ~grown, self.counter + np.int32(1), np.int32(0))
        return dataclasses.replace(self, loss_scale=loss_scale.astype(np.float32),
                             counter=counter.astype(np.int32))


def select_tree(pred, on_true, on_false):
    """``on_true`` where ``pred`` (a scalar bool) holds, else ``on_false``, leaf by leaf."""
    return tree_map(lambda a, b: np.where(pred, a, b), on_true, on_false)
