"""NumPy as a device's array module, strict as CuPy is about host arrays: a ufunc given a plain
NumPy array (not a scalar) raises ``TypeError``, as CuPy's do, and everything made through the
module is a :class:`DeviceArray`.  Running an executor with ``xp=strict_xp.module()`` on the CPU
finds the host arrays that would reach a GPU's kernels (a program's constants, an input left on
the host), which plain NumPy standing in for CuPy cannot."""
from __future__ import annotations

import types

import numpy as np


class DeviceArray(np.ndarray):
    """An array "on the device": ufuncs take these and scalars, never a plain host array."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _check(ufunc.__name__, inputs + tuple(kwargs.get("out") or ()))
        inputs = tuple(_host(a) for a in inputs)
        if "out" in kwargs:
            kwargs["out"] = tuple(_host(o) for o in kwargs["out"])
        return _device(getattr(ufunc, method)(*inputs, **kwargs))


def _check(name, operands):
    for a in operands:
        if type(a) is np.ndarray:
            raise TypeError(f"{name}: a host numpy.ndarray {a.shape} {a.dtype} among device "
                            f"arrays (CuPy raises 'Unsupported type <class numpy.ndarray>')")


def _host(a):
    return a.view(np.ndarray) if isinstance(a, DeviceArray) else a


def _device(out):
    if type(out) is np.ndarray:
        return out.view(DeviceArray)
    if isinstance(out, (tuple, list)):
        return type(out)(_device(o) for o in out)
    return out


class _Ufunc:
    def __init__(self, ufunc):
        self._ufunc, self.__name__ = ufunc, ufunc.__name__

    def __call__(self, *args, **kwargs):
        out = kwargs.get("out")
        if out is not None:
            out = out if isinstance(out, tuple) else (out,)
            _check(self.__name__, out)
            kwargs["out"] = tuple(_host(o) for o in out)
        _check(self.__name__, args)
        return _device(self._ufunc(*[_host(a) for a in args], **kwargs))

    def __getattr__(self, name):
        return getattr(self._ufunc, name)


def module():
    """A fresh module object: NumPy's names, its functions returning device arrays."""
    xp = types.ModuleType("strict_xp")

    def wrap(name):
        attr = getattr(np, name)
        if isinstance(attr, np.ufunc):
            return _Ufunc(attr)
        if callable(attr) and not isinstance(attr, type):
            return lambda *a, **k: _device(attr(*a, **k))
        return attr
    for name in dir(np):
        if not name.startswith("_"):
            try:
                setattr(xp, name, wrap(name))
            except AttributeError:
                pass
    xp.ndarray = np.ndarray
    return xp
