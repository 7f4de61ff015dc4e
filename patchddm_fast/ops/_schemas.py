"""The op schemas of schemas.def, for the Triton ops.

schemas.def is the one place where the schema of every op is written: csrc/ops.cpp includes
it to register the compiled ops (patchddm::<op>), and `triton_op` below registers each Triton
kernel (patchddm_triton::<op>) under the same schema, so that the two cannot drift apart.
"""

from __future__ import annotations

import functools
import importlib.resources
import re

import torch

_ENTRY = re.compile(r"PATCHDDM_SCHEMA\(\s*((?:\"[^\"]*\"\s*)+)\)")
_MUTATED = re.compile(r"Tensor\([a-z]+!\)\??\s+(\w+)")


@functools.cache
def schemas() -> dict[str, str]:
    """op name -> its schema without the name, e.g. "(Tensor h, Tensor skip) -> Tensor"."""
    text = importlib.resources.files(__package__).joinpath("schemas.def").read_text()
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("//"))
    found = {}
    for match in _ENTRY.finditer(text):
        schema = "".join(re.findall(r"\"([^\"]*)\"", match.group(1)))
        name, paren, rest = schema.partition("(")
        found[name.strip()] = paren + rest
    if not found:
        raise RuntimeError("patchddm_fast/ops/schemas.def holds no PATCHDDM_SCHEMA entry")
    return found


def schema(op: str) -> str:
    try:
        return schemas()[op]
    except KeyError:
        raise KeyError(f"no schema for {op!r} in schemas.def; it has {sorted(schemas())}") from None


def mutated_args(op: str) -> tuple[str, ...]:
    """The arguments that the op's schema marks as written (Tensor(a!))."""
    return tuple(_MUTATED.findall(schema(op)))


def triton_op(op: str):
    """Decorator: `fn` as the custom op patchddm_triton::<op>, with patchddm::<op>'s schema."""
    return torch.library.custom_op(f"patchddm_triton::{op}", mutates_args=mutated_args(op), schema=schema(op))
