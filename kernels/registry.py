"""The kernel registry: a plain table op -> {name: function}, so a kernel is swapped without editing the model.

    from slm import kernels
    kernels.available()                        # {"attention": ["eager", "sdpa", "triton"], ...}
    attention = kernels.get("attention", "sdpa")
    kernels.register("attention", "mine", my_attention)   # then slm.OPT(config, kernels={"attention": "mine"})

Every implementation of an op takes the signature of that op's reference (`REFERENCE` names it; the
torch references live in kernels/reference.py and kernels/attention.py), so any two are interchangeable.
kernels/__init__.py registers the implementations this package ships; a user's function registered under
a new name joins them, and `pytest tests/test_kernel_conformance.py --kernel op=name` checks it.
Commands take the choice as `--kernels attention=triton,layer_norm=triton` or `--attn NAME` (`add_arguments`).
"""

import argparse
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


def parse(text: str) -> dict[str, str]:
    """A command line's `op=name,op=name` -> {op: name}, each looked up now; a malformed entry or an unknown
    op or name is a ValueError saying which."""
    chosen = {}
    for item in (part.strip() for part in text.split(",")):
        op, sep, name = (s.strip() for s in item.partition("="))
        if not (op and sep and name):
            raise ValueError(f"kernels: {item!r} is not op=name (e.g. attention=triton,layer_norm=triton)")
        get(op, name)
        chosen[op] = name
    return chosen



def argument(text: str) -> dict[str, str]:
    """`parse` as an argparse type: its sentence becomes the command's usage error (argparse would replace
    a ValueError's own message with a generic one)."""
    try:
        return parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


class _Merge(argparse.Action):
    """Adds a flag's {op: name} to args.kernels, so later flags override earlier ones entry by entry."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), **values})


def add_arguments(parser: argparse.ArgumentParser, defaults: str) -> None:
    """The commands' kernel flags: `--kernels op=name,...` and `--attn NAME` (the same as --kernels
    attention=NAME), both into args.kernels, {op: name} of the ops given (None when neither is);
    `defaults` tells the help what unset ops take."""
    parser.add_argument("--kernels", type=argument, action=_Merge, default=None, metavar="OP=NAME,...",
                        help="kernel implementations by op, e.g. attention=triton,layer_norm=triton,"
                             f"linear_cross_entropy=triton (registered: {available()}); unset ops: {defaults}")
    parser.add_argument("--attn", dest="kernels", type=lambda name: argument(f"attention={name}"), action=_Merge,
                        metavar="NAME", help="attention implementation, the same as --kernels attention=NAME")
