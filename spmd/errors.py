"""Exception types.  Every message names the offending value and says how to fix it."""


class SpmdError(Exception):
    """Base class of the errors spmd raises on purpose."""


class MeshError(SpmdError, ValueError):
    """A mesh, device list or axis name is malformed."""


class ShardingError(SpmdError, ValueError):
    """A PartitionSpec or sharding does not fit the mesh or the array."""


class UnreducedError(ShardingError, NotImplementedError):
    """An op that is not linear met a value that is a sum still pending over mesh axes
    (unreduced): the sum must be made first."""


class TracingError(SpmdError, TypeError):
    """A traced value was used in a way that needs a concrete value."""


class VmaError(SpmdError, ValueError):
    """A value's varying-mesh-axes type does not allow the operation."""


class CollectiveTimeoutError(SpmdError, TimeoutError):
    """A collective did not complete before its deadline."""


class CollectiveMismatchError(SpmdError, RuntimeError):
    """The processes of a group called different collectives (op, shape, dtype or axes) at the
    same point of the program."""


class ProcessExitedError(SpmdError, RuntimeError):
    """A process of the group exited while the others waited for it in a collective."""
