"""The one way this package changes vLLM: named method replacements, kept reversible.

A patch is a class named after what it changes. It lists the methods it replaces; the
original of each is kept and reachable through `original(...)`, and patching the same
method twice is an error, so every touch of vLLM is visible in one place (integration/).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar

_ORIGINALS: dict[tuple[type, str], Callable[..., Any]] = {}


class AlreadyPatched(RuntimeError):
    pass


class MethodPatch:
    """Subclasses set `target` and define the replacement methods named in `methods`."""

    target: ClassVar[type]
    methods: ClassVar[tuple[str, ...]]
    # The parameters each patched method must have; a vLLM release that changes them fails
    # the signature test instead of misbehaving at run time.
    expected_parameters: ClassVar[dict[str, tuple[str, ...]]]

    @classmethod
    def apply(cls) -> None:
        for name in cls.methods:
            key = (cls.target, name)
            if key in _ORIGINALS:
                raise AlreadyPatched(f"{cls.target.__name__}.{name} is already patched")
            _ORIGINALS[key] = getattr(cls.target, name)
            setattr(cls.target, name, getattr(cls, name))

    @classmethod
    def original(cls, name: str) -> Callable[..., Any]:
        return _ORIGINALS[(cls.target, name)]

    @classmethod
    def is_applied(cls) -> bool:
        return all((cls.target, name) in _ORIGINALS for name in cls.methods)

    @classmethod
    def signature_mismatches(cls) -> list[str]:
        """Differences between the installed vLLM's methods and what the patch was written for."""
        problems = []
        for name, expected in cls.expected_parameters.items():
            function = _ORIGINALS.get((cls.target, name), getattr(cls.target, name, None))
            if function is None:
                problems.append(f"{cls.target.__name__}.{name} no longer exists")
                continue
            actual = tuple(inspect.signature(function).parameters)
            if actual != expected:
                problems.append(
                    f"{cls.target.__name__}.{name} takes {actual}, the patch expects {expected}"
                )
        return problems
