"""spmd: a JAX-style functional SPMD framework over NumPy programs.

>>> import numpy as np, spmd
>>> mesh = spmd.make_mesh((2, 4), ("data", "model"))
>>> x = spmd.device_put(np.arange(32.).reshape(8, 4), spmd.NamedSharding(mesh, spmd.P("data", "model")))
>>> x.sharding.shard_shape(x.shape)
(4, 1)
"""
from .devices import Device, devices, local_devices, device_count, local_device_count
from .distributed import process_index, process_count
from .errors import (SpmdError, MeshError, ShardingError, TracingError, VmaError,
                     CollectiveTimeoutError, UnreducedError)
from .mesh import Mesh, AbstractMesh, AxisType, make_mesh, set_mesh, get_mesh
from .sharding import PartitionSpec, P, NamedSharding
from .array import Array, Shard, device_put
from .core import Program, Primitive, Tracer, bind
from .jit import jit, make_program, with_sharding_constraint
from . import eager as _eager  # noqa: F401  (NumPy on sharded Arrays)
from . import sharding_rules as _sharding_rules  # noqa: F401  (types on Explicit axes)
from .shard_map import shard_map
from .explicit import (typeof, reshard, get_abstract_mesh, auto_axes, explicit_axes, ShapedArray,
                       ManualAxisType)
from .collectives import (psum, pmean, pmax, pmin, all_gather, psum_scatter, all_to_all, ppermute,
                          pbroadcast, axis_index, axis_size, pvary, pcast)
from .transforms.api import grad, value_and_grad, vjp, jvp, linearize, jacfwd, jacrev
from .transforms.vmap import vmap
from .transforms.checkpoint import checkpoint, checkpoint_policies, remat
from .custom_derivatives import custom_jvp, custom_vjp
from . import debug, interop
from .debug import pure_callback
from .array import device_get, block_until_ready
from .jit import eval_shape, ShapeDtypeStruct
from . import numpy, prims, executors, distributed
from . import random, tree_util, nn, lax
from . import optim, parallel
from . import io
from .prims import stop_gradient
from .inspect import collectives_of, print_collectives
from .profiler import profile
from .visualize import visualize_sharding
from . import gpu  # noqa: F401  (plug-in: registers the "gpu" platform; CuPy loads on first use)

__version__ = "0.1.0"
