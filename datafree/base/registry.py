"""One small registry class, used for every kind of component (models, generators, condensers).

Example:
    >>> import torch
    >>> MODELS = Registry("architecture")
    >>> @MODELS.register("tiny")
    ... def tiny(num_classes=10):
    ...     return torch.nn.Linear(4, num_classes)
    >>> MODELS.create("tiny", num_classes=3).out_features
    3
"""
from __future__ import annotations

from typing import Callable

from datafree.base.errors import UserError


class Registry(dict):
    """A name -> constructor mapping whose mistakes are one clear sentence."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable:
        """Decorator: add a constructor (function or class) under ``name``."""

        def add(fn):
            self[name] = fn
            return fn

        return add

    def names(self) -> list[str]:
        return sorted(self)

    def get_or_fail(self, name: str) -> Callable:
        if name not in self:
            raise UserError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self[name]

    def create(self, name: str, *args, **kwargs):
        """Build ``name``; settings it does not take are a :class:`UserError` naming them."""
        constructor = self.get_or_fail(name)
        try:
            return constructor(*args, **kwargs)
        except TypeError as e:
            raise UserError(f"{self.kind} {name!r} does not take these settings: {e}") from None
