"""Transformations of Programs, each a Program -> Program interpreter that re-binds every
equation through one rule of its primitive, so the result is an ordinary Program: it prints,
jits, runs on any executor and can be transformed again.

- ``ad``: JVP, partial evaluation and transposition (the rules' helpers: ``Zero``,
  ``UndefinedPrimal``, ``linear_jvp``...);
- ``api``: ``jvp vjp linearize grad value_and_grad jacfwd jacrev``;
- ``vmap``: the batching interpreter and the shared batching-rule builders;
- ``checkpoint``: rematerialisation with a save policy;
- ``check``: ``check_grads`` against finite differences.
"""
