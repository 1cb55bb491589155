"""The torch-free method catalog (`engine.catalog`) stays equal to the engine's registry.

The registry (`engine.methods.METHODS` and each method's `Config` dataclass) is the source;
the catalog is what the API validates `method_options` with at intake. They must agree on the
methods, on each option's name, order, type and default, and on the values admitted: every
value the catalog admits (its bounds, its choices) must build the `Config`, and every probed
value the `Config` refuses must be refused by the catalog too, or a request would be accepted
and its job fail on the worker.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine import catalog
from engine.errors import InvalidInput
from engine.methods import DEFAULT_METHOD, METHODS, make_method

ROOT = Path(__file__).parents[2]


def _config_fields(name: str) -> list[dataclasses.Field[Any]]:
    return list(dataclasses.fields(METHODS[name].Config))


def _engine_accepts(method: str, options: dict[str, Any]) -> bool:
    try:
        make_method(method, options)
    except InvalidInput:
        return False
    return True


def _probes(option: catalog.Option) -> list[Any]:
    """Values at, inside and outside the option's bounds, and of the wrong type."""
    if option.type == "boolean":
        return [True, False, 0, "yes", None]
    if option.type == "string":
        return [*(option.choices or ()), "not-a-choice", "", 1, None]
    values: list[Any] = [option.default, 0, 1, -1, 2, 0.5, 3, 10, 1000, 10**6, -(10**6), None]
    for bound in (option.minimum, option.maximum, option.exclusive_minimum, option.exclusive_maximum):
        if bound is not None:
            values += [bound, bound - 1, bound + 1, bound - 1e-6, bound + 1e-6]
    if option.type == "integer":
        values = [int(v) if isinstance(v, float) and v.is_integer() else v for v in values]
    return values


def test_the_catalog_lists_the_registry_methods() -> None:
    assert list(catalog.METHODS) == list(METHODS)
    assert tuple(METHODS) == catalog.METHOD_NAMES
    assert catalog.DEFAULT_METHOD == DEFAULT_METHOD


@pytest.mark.parametrize("name", list(METHODS))
def test_options_match_the_config_fields(name: str) -> None:
    spec = catalog.METHODS[name]
    fields = _config_fields(name)
    assert [o.name for o in spec.options] == [f.name for f in fields]
    for option, f in zip(spec.options, fields, strict=True):
        assert option.python_type == f.type, (name, option.name)
        assert option.default == f.default, (name, option.name)
        assert type(option.default) is type(f.default), (name, option.name)
    assert _engine_accepts(name, spec.defaults())


def test_choices_are_the_engines() -> None:
    from engine.balance import BALANCERS
    from engine.methods.feature_constraint import FEATURE_LOSSES
    from engine.training import OPTIMIZERS

    assert catalog.OPTIMIZERS == OPTIMIZERS
    assert catalog.BALANCERS == BALANCERS
    assert catalog.FEATURE_LOSSES == FEATURE_LOSSES


@pytest.mark.parametrize("name", list(METHODS))
def test_every_value_the_catalog_admits_builds_the_config(name: str) -> None:
    spec = catalog.METHODS[name]
    admitted = 0
    for option in spec.options:
        for value in _probes(option):
            if not spec.check({option.name: value}):
                admitted += 1
                assert _engine_accepts(name, {option.name: value}), (name, option.name, value)
    assert admitted >= len(spec.options)


@pytest.mark.parametrize("name", list(METHODS))
def test_the_catalog_refuses_whatever_the_config_refuses(name: str) -> None:
    spec = catalog.METHODS[name]
    refused_by_engine = 0
    for option in spec.options:
        for value in _probes(option):
            if not _engine_accepts(name, {option.name: value}):
                refused_by_engine += 1
                assert spec.check({option.name: value}), (name, option.name, value)
    if spec.options:
        assert refused_by_engine > 0  # the probes reach the Config's checks


def test_rules_between_options_are_the_configs() -> None:
    bad = {"epochs": 2, "max_epochs": 3}
    assert not _engine_accepts("scrub", bad)
    problems = catalog.check_method_options("scrub", bad)
    assert [p.option for p in problems] == ["max_epochs"]
    assert _engine_accepts("scrub", {"epochs": 3, "max_epochs": 3})
    assert not catalog.check_method_options("scrub", {"epochs": 3, "max_epochs": 3})


def test_unknown_options_are_named() -> None:
    problems = catalog.check_method_options("finetune", {"lr": 0.1, "learning_rate": 0.1})
    assert [p.option for p in problems] == ["learning_rate"]
    assert "unknown option" in problems[0].message
    with pytest.raises(InvalidInput):
        make_method("finetune", {"learning_rate": 0.1})


def test_the_catalog_imports_no_torch() -> None:
    code = "import sys, engine.catalog; print('\\n'.join(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    assert "engine.catalog" in out
    assert not {m.split(".")[0] for m in out} & {"torch", "torchvision", "numpy"}
