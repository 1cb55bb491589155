"""The registry of unlearning methods: name -> class. Adding one is a module and a line here."""

from __future__ import annotations

from typing import Any

from engine.errors import UnknownName
from engine.methods.bad_teacher import BadTeacher
from engine.methods.base import Method, MethodOutput, UnlearnContext
from engine.methods.feature_constraint import FeatureConstraint
from engine.methods.finetune import Finetune
from engine.methods.neggrad_plus import NegGradPlus
from engine.methods.retrain import Retrain
from engine.methods.scrub import Scrub
from engine.methods.ssd import SelectiveSynapticDampening
from engine.methods.unsir import Unsir

METHODS: dict[str, type[Method[Any]]] = {
    cls.name: cls
    for cls in (
        FeatureConstraint,
        Retrain,
        Finetune,
        NegGradPlus,
        BadTeacher,
        Scrub,
        Unsir,
        SelectiveSynapticDampening,
    )
}
DEFAULT_METHOD = FeatureConstraint.name


def make_method(name: str, options: dict[str, Any] | None = None) -> Method[Any]:
    """Instantiate a registered method with its options (unknown options are refused)."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise UnknownName("method", name, METHODS) from None
    return cls(**(options or {}))


__all__ = ["DEFAULT_METHOD", "METHODS", "Method", "MethodOutput", "UnlearnContext", "make_method"]
