"""The kernel registry: a plain table op -> {name: function}, so a kernel is swapped without editing the model.

    import kernels
    kernels.available()                        # {"attention": ["eager", "sdpa", "triton"], ...}
    attention = kernels.get("attention", "sdpa")
    kernels.register("attention", "mine", my_attention)   # then slm.OPT(config, kernels={"attention": "mine"})

Every implementation of an op takes the signature of that op's reference (`REFERENCE` names it; the
torch references live in kernels/reference.py and kernels/attention.py), so any two are interchangeable.
kernels/__init__.py registers the implementations this package ships; a user's function registered under
a new name joins them, and `pytest tests/test_kernel_conformance.py --kernel op=name` checks it.
"""

from typing import Callable

REFERENCE = {"attention": "eager", "layer_norm": "torch", "linear_cross_entropy": "torch"}

_TABLE: dict[str, dict[str, Callable]] = {op: {} for op in REFERENCE}


def register(op: str, name: str, fn: Callable) -> None:
    """Make `fn` the implementation `name` of `op` (replacing one of that name); ops are those of REFERENCE."""
    if op not in _TABLE:
        raise ValueError(f"kernels.register: unknown op {op!r}; the ops are {', '.join(_TABLE)}")
    if not callable(fn):
        raise TypeError(f"kernels.register({op!r}, {name!r}, ...): expected a function, got {type(fn).__name__}")
    _TABLE[op][name] = fn


def get(op: str, name: str) -> Callable:
    """The implementation `name` of `op`; an unknown op or name is a ValueError listing what exists."""
    if op not in _TABLE or name not in _TABLE[op]:
        listing = "; ".join(f"{o}: {', '.join(names)}" for o, names in available().items())
        what = f"op {op!r}" if op not in _TABLE else f"{op} implementation {name!r}"
        raise ValueError(f"kernels: unknown {what}; registered are {listing}")
    return _TABLE[op][name]


def available() -> dict[str, list[str]]:
    """{op: [names]} of everything registered, the shipped implementations and the users'."""
    return {op: list(names) for op, names in _TABLE.items()}
