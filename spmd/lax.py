"""``jax.lax``'s functions under their JAX names, so ``import spmd.lax as lax`` ports a program.

The primitives themselves live in ``spmd.prims`` (one block each, with all their rules); this
module is the API a program calls: the collectives, ``stop_gradient`` and the structured
operations, each a thin function over NumPy code or a primitive.

>>> import numpy as np, spmd, spmd.lax as lax
>>> mesh = spmd.make_mesh((8,), ("i",))
>>> f = spmd.shard_map(lambda x: lax.psum(x, "i"), mesh=mesh, in_specs=spmd.P("i"), out_specs=spmd.P())
>>> np.asarray(f(np.arange(8.))).tolist()
[28.0]
"""
from __future__ import annotations

from .collectives import (all_gather, all_to_all, axis_index, axis_size, pbroadcast, pmax, pmean,
                          pmin, ppermute, psum, psum_scatter, pvary)
from .prims import stop_gradient

__all__ = ["all_gather", "all_to_all", "axis_index", "axis_size", "pbroadcast", "pmax", "pmean",
           "pmin", "ppermute", "psum", "psum_scatter", "pvary", "stop_gradient"]
