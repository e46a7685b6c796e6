"""Transformations of Programs: autodiff (``ad``), batching (``vmap``), rematerialisation
(``checkpoint``), and the user-facing functions built on them (``api``).

Each transformation is a Program -> Program interpreter that re-binds every equation through
one rule of its primitive, so the result is an ordinary Program: it prints, jits, runs on any
executor and can be transformed again.
"""
