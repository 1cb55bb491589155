"""The registry of unlearning methods: name -> class. Adding one is a module and a line here."""

from __future__ import annotations

from typing import Any

from engine.errors import UnknownName
from engine.methods.base import Method, MethodOutput, UnlearnContext
from engine.methods.feature_constraint import FeatureConstraint
from engine.methods.retrain import Retrain

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        FeatureConstraint,
        Retrain,
    )
}
DEFAULT_METHOD = FeatureConstraint.name


def make_method(name: str, options: dict[str, Any] | None = None) -> Method:
    """Instantiate a registered method with its options (unknown options are refused)."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise UnknownName("method", name, METHODS) from None
    return cls(**(options or {}))


__all__ = ["DEFAULT_METHOD", "METHODS", "Method", "MethodOutput", "UnlearnContext", "make_method"]
