"""Pytrees with ``jax.tree_util``'s names, on optree.

The registry is optree's global one, the one ``spmd.jit``, ``vmap``, ``grad`` and
``shard_map`` flatten their arguments with: a class registered here passes through all of
them.  As in JAX, ``None`` is an empty subtree (no leaf), dicts flatten in sorted key order,
and a ``PartitionSpec`` (a tuple subclass) or a ``NamedSharding`` is a leaf.

Key paths are JAX's: ``DictKey(key)``, ``SequenceKey(idx)``, ``GetAttrKey(name)`` (namedtuple
fields, dataclass fields) and ``FlattenedIndexKey(key)`` (children of a node registered
without keys), and ``keystr`` prints them as JAX does (``['a'][0].w``).

>>> from spmd import tree_util
>>> tree_util.tree_map(lambda x: x * 2, {"a": 1, "b": (2, None)})
{'a': 2, 'b': (4, None)}
>>> [tree_util.keystr(p) for p, _ in tree_util.tree_flatten_with_path({"a": [1, 2]})[0]]
["['a'][0]", "['a'][1]"]
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import optree
import optree.registry

__all__ = ["tree_map", "tree_map_with_path", "tree_leaves", "tree_leaves_with_path",
           "tree_structure", "tree_flatten", "tree_flatten_with_path", "tree_unflatten",
           "tree_reduce", "tree_all", "register_pytree_node", "register_pytree_with_keys",
           "register_pytree_node_class", "register_dataclass", "register_static", "keystr",
           "Partial", "DictKey", "SequenceKey", "GetAttrKey", "FlattenedIndexKey", "PyTreeDef"]

PyTreeDef = optree.PyTreeSpec
_GLOBAL = getattr(optree.registry, "__GLOBAL_NAMESPACE")   # the registry jit & co. flatten with


# ---------------------------------------------------------------------------------------------
# key paths
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DictKey:
    key: Any

    def __str__(self):
        return f"[{self.key!r}]"

    def _simple(self):
        return self.key


@dataclasses.dataclass(frozen=True)
class SequenceKey:
    idx: int

    def __str__(self):
        return f"[{self.idx}]"

    def _simple(self):
        return self.idx


@dataclasses.dataclass(frozen=True)
class GetAttrKey:
    name: str

    def __str__(self):
        return f".{self.name}"

    def _simple(self):
        return self.name


@dataclasses.dataclass(frozen=True)
class FlattenedIndexKey:
    key: int

    def __str__(self):
        return f"[<flat index {self.key}>]"

    def _simple(self):
        return self.key


_KEYS = (DictKey, SequenceKey, GetAttrKey, FlattenedIndexKey)


def _key_of(entry) -> Any:
    """JAX's key for one step of an optree accessor."""
    if isinstance(entry.entry, _KEYS):              # a node registered with its own keys
        return entry.entry
    if isinstance(entry, optree.MappingEntry):
        return DictKey(entry.key)
    if isinstance(entry, (optree.NamedTupleEntry, optree.StructSequenceEntry)):
        return GetAttrKey(entry.field)
    if isinstance(entry, optree.SequenceEntry):
        return SequenceKey(entry.index)
    if isinstance(entry, optree.GetAttrEntry):
        return GetAttrKey(entry.name)
    return FlattenedIndexKey(entry.entry)


def _paths(tree, is_leaf):
    accessors, leaves, spec = optree.tree_flatten_with_accessor(tree, is_leaf=is_leaf)
    return [tuple(_key_of(e) for e in a) for a in accessors], leaves, spec


def keystr(keys, *, simple: bool = False, separator: str = "") -> str:
    """A key path as text: ``['a'][0].w``; ``simple=True`` gives the bare keys (``a``, ``0``,
    ``w``) joined by ``separator``."""
    if not simple:
        return separator.join(map(str, keys))
    return separator.join(str(k._simple() if isinstance(k, _KEYS) else k) for k in keys)


# ---------------------------------------------------------------------------------------------
# flattening, mapping, reducing
# ---------------------------------------------------------------------------------------------

def flat_call(fn: Callable, in_tree):
    """(spmd's own, not ``jax.tree_util``'s) ``fn`` of pytree arguments as a function of their
    leaves returning leaves, for tracing: each call appends its output tree to the returned
    box."""
    box = []

    def flat(*leaves):
        out = fn(*optree.tree_unflatten(in_tree, list(leaves)))
        leaves_out, tree = optree.tree_flatten(out, none_is_leaf=False)
        box.append(tree)
        return leaves_out
    return flat, box


def tree_flatten(tree, is_leaf: Callable | None = None):
    return optree.tree_flatten(tree, is_leaf=is_leaf)


def tree_unflatten(treedef, leaves):
    return optree.tree_unflatten(treedef, list(leaves))


def tree_leaves(tree, is_leaf: Callable | None = None) -> list:
    return optree.tree_leaves(tree, is_leaf=is_leaf)


def tree_structure(tree, is_leaf: Callable | None = None):
    return optree.tree_structure(tree, is_leaf=is_leaf)


def tree_map(f: Callable, tree, *rest, is_leaf: Callable | None = None):
    return optree.tree_map(f, tree, *rest, is_leaf=is_leaf)


def tree_flatten_with_path(tree, is_leaf: Callable | None = None):
    """``([(key path, leaf), ...], treedef)``."""
    paths, leaves, spec = _paths(tree, is_leaf)
    return list(zip(paths, leaves)), spec


def tree_leaves_with_path(tree, is_leaf: Callable | None = None) -> list:
    return tree_flatten_with_path(tree, is_leaf)[0]


def tree_map_with_path(f: Callable, tree, *rest, is_leaf: Callable | None = None):
    """``f(key_path, leaf, *leaves_of_rest)`` over the leaves of ``tree``."""
    paths, leaves, spec = _paths(tree, is_leaf)
    others = [spec.flatten_up_to(r) for r in rest]
    return spec.unflatten([f(p, *xs) for p, *xs in zip(paths, leaves, *others)])


_NO_INITIAL = object()


def tree_reduce(function: Callable, tree, initializer: Any = _NO_INITIAL,
                is_leaf: Callable | None = None):
    leaves = tree_leaves(tree, is_leaf)
    if initializer is _NO_INITIAL:
        return functools.reduce(function, leaves)
    return functools.reduce(function, leaves, initializer)


def tree_all(tree, *, is_leaf: Callable | None = None) -> bool:
    return all(tree_leaves(tree, is_leaf))


# ---------------------------------------------------------------------------------------------
# registering node types (in the registry every spmd transformation uses)
# ---------------------------------------------------------------------------------------------

def register_pytree_node(nodetype: type, flatten_func: Callable, unflatten_func: Callable,
                         flatten_with_keys_func: Callable | None = None) -> None:
    """``flatten_func(x) -> (children, aux_data)``, ``unflatten_func(aux_data, children)``;
    ``flatten_with_keys_func(x) -> ([(key, child), ...], aux_data)`` names the children in key
    paths (else they are ``FlattenedIndexKey(i)``)."""
    if flatten_with_keys_func is None:
        flatten = flatten_func
    else:
        def flatten(x):
            pairs, aux = flatten_with_keys_func(x)
            pairs = list(pairs)
            return [c for _, c in pairs], aux, [k for k, _ in pairs]
    optree.register_pytree_node(nodetype, flatten, unflatten_func, namespace=_GLOBAL)


def register_pytree_with_keys(nodetype: type, flatten_with_keys: Callable, unflatten_func: Callable,
                              flatten_func: Callable | None = None) -> None:
    def plain(x):
        pairs, aux = flatten_with_keys(x)
        return [c for _, c in pairs], aux
    register_pytree_node(nodetype, flatten_func or plain, unflatten_func, flatten_with_keys)


def register_pytree_node_class(cls: type) -> type:
    """Decorator: ``cls.tree_flatten()`` and ``cls.tree_unflatten(aux_data, children)``."""
    register_pytree_node(cls, lambda x: x.tree_flatten(), cls.tree_unflatten)
    return cls


def register_dataclass(nodetype: type | None = None, data_fields=None, meta_fields=None,
                       drop_fields=()):
    """A dataclass as a pytree: ``data_fields`` are children (keyed ``GetAttrKey(name)``),
    ``meta_fields`` static.  Without them, every init field is data except those declared
    ``field(metadata=dict(static=True))``.  Usable as a decorator."""
    if nodetype is None:
        return functools.partial(register_dataclass, data_fields=data_fields,
                                 meta_fields=meta_fields, drop_fields=drop_fields)
    if data_fields is None or meta_fields is None:
        if (data_fields is None) != (meta_fields is None):
            raise TypeError("register_dataclass: give both data_fields and meta_fields, or neither")
        if not dataclasses.is_dataclass(nodetype):
            raise TypeError(f"register_dataclass: {nodetype.__name__} is not a dataclass; give "
                            f"data_fields and meta_fields")
        fields = [f for f in dataclasses.fields(nodetype) if f.init and f.name not in drop_fields]
        meta_fields = [f.name for f in fields if f.metadata.get("static", False)]
        data_fields = [f.name for f in fields if not f.metadata.get("static", False)]
    data_fields, meta_fields = tuple(data_fields), tuple(meta_fields)

    def flatten_with_keys(x):
        return ([(GetAttrKey(n), getattr(x, n)) for n in data_fields],
                tuple(getattr(x, n) for n in meta_fields))

    def unflatten(meta, children):
        return nodetype(**dict(zip(data_fields, children)), **dict(zip(meta_fields, meta)))
    register_pytree_with_keys(nodetype, flatten_with_keys, unflatten)
    return nodetype


def register_static(cls: type) -> type:
    """``cls`` as a node with no children: its instances are part of the tree's structure."""
    register_pytree_node(cls, lambda x: ((), x), lambda x, _: x)
    return cls


class Partial(functools.partial):
    """``functools.partial`` as a pytree: the function is static, the bound arguments are
    leaves, so a ``Partial`` passes through ``jit`` and ``vmap`` like an array."""

    def __new__(klass, func, *args, **kw):
        if isinstance(func, functools.partial):      # a Partial of a Partial: one level
            original, func = func, func.func
            args, kw = original.args + args, {**original.keywords, **kw}
        return super().__new__(klass, func, *args, **kw)


register_pytree_node(Partial, lambda p: ((p.args, p.keywords), p.func),
                     lambda func, xs: Partial(func, *xs[0], **xs[1]))
