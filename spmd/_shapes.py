"""Shape arithmetic without NumPy's limit of 32 dimensions (``np.broadcast_shapes`` has it; an
array may have up to 64, and the stacked executor adds the mesh dims to every value)."""
from __future__ import annotations


def broadcast_shapes(*shapes) -> tuple[int, ...]:
    """NumPy's broadcasting of ``shapes`` (ints or tuples), for any number of dimensions.

    >>> broadcast_shapes((2, 1), (3,), ())
    (2, 3)
    """
    shapes = [(s,) if isinstance(s, int) else tuple(s) for s in shapes]
    if shapes and all(s == shapes[0] for s in shapes[1:]):     # the common case: one shape
        return shapes[0]
    rank = max((len(s) for s in shapes), default=0)
    out = [1] * rank
    for s in shapes:
        for i, n in enumerate(s, rank - len(s)):
            if n != 1:
                if out[i] not in (1, n):
                    raise ValueError(f"shape mismatch: objects cannot be broadcast to a single "
                                     f"shape; {' and '.join(map(str, shapes))} disagree at "
                                     f"dimension {i - rank} ({out[i]} vs {n}).")
                out[i] = n
    return tuple(out)
