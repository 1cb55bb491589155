"""The catalog of unlearning methods: each method's name and option schema, without torch.

The API validates `method` and `method_options` at intake with this catalog and declares them
in its OpenAPI document from it; the worker later builds the method from the registry
(`engine.methods.METHODS`), whose `Config` dataclasses are the source this catalog is read
from. `tests/engine/test_catalog.py` keeps the two equal: the same methods, the same options
in the same order with the same types and defaults, every value the catalog admits accepted
by the method's `Config`, and every probed value the `Config` refuses refused here too.

An option's bounds are the `Config`'s own checks plus an upper bound where the `Config` has
none, so that one request cannot ask for a job that never ends (10^6 epochs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

OPTIMIZERS = ("sgd", "adam")
BALANCERS = ("dwa", "uncertainty", "gradnorm", "fixed")
FEATURE_LOSSES = ("mse", "l1", "cosine")
DEFAULT_METHOD = "feature_constraint"

OptionType = Literal["number", "integer", "boolean", "string"]
_PYTHON_TYPES: dict[OptionType, str] = {
    "number": "float",
    "integer": "int",
    "boolean": "bool",
    "string": "str",
}


@dataclass(frozen=True)
class Option:
    """One option of a method: a JSON type, a default and the values it admits."""

    name: str
    type: OptionType
    default: Any
    description: str = ""
    nullable: bool = False
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    exclusive_maximum: float | None = None
    choices: tuple[str, ...] | None = None

    @property
    def python_type(self) -> str:
        """The annotation the method's `Config` field carries (`float`, `int | None`, ...)."""
        base = _PYTHON_TYPES[self.type]
        return f"{base} | None" if self.nullable else base

    def problem(self, value: Any) -> str | None:
        """Why `value` is not admitted, or None when it is."""
        if value is None:
            return None if self.nullable else "must not be null"
        if self.type == "boolean":
            return None if isinstance(value, bool) else "must be a boolean"
        if self.type == "string":
            if not isinstance(value, str):
                return "must be a string"
            if self.choices is not None and value not in self.choices:
                return f"must be one of {list(self.choices)}"
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be {'an integer' if self.type == 'integer' else 'a number'}"
        if self.type == "integer" and not (isinstance(value, int) or float(value).is_integer()):
            return "must be an integer"  # JSON Schema: 3.0 is an integer, 3.5 is not
        if not math.isfinite(value):
            return "must be a finite number"
        return self._bound_problem(value)

    def _bound_problem(self, value: float) -> str | None:
        if self.minimum is not None and value < self.minimum:
            return f"must be >= {self.minimum}"
        if self.exclusive_minimum is not None and value <= self.exclusive_minimum:
            return f"must be > {self.exclusive_minimum}"
        if self.maximum is not None and value > self.maximum:
            return f"must be <= {self.maximum}"
        if self.exclusive_maximum is not None and value >= self.exclusive_maximum:
            return f"must be < {self.exclusive_maximum}"
        return None

    def json_schema(self) -> dict[str, Any]:
        """The option as a JSON Schema (OpenAPI 3.1)."""
        schema: dict[str, Any] = {"type": [self.type, "null"] if self.nullable else self.type}
        for key, value in (
            ("minimum", self.minimum),
            ("maximum", self.maximum),
            ("exclusiveMinimum", self.exclusive_minimum),
            ("exclusiveMaximum", self.exclusive_maximum),
        ):
            if value is not None:
                schema[key] = value
        if self.choices is not None:
            schema["enum"] = [*self.choices, None] if self.nullable else list(self.choices)
        schema["default"] = self.default
        if self.description:
            schema["description"] = self.description
        return schema


@dataclass(frozen=True)
class Rule:
    """A constraint between options (JSON Schema cannot state it; intake checks it)."""

    options: tuple[str, ...]
    description: str
    holds: Callable[[Mapping[str, Any]], bool]


@dataclass(frozen=True)
class MethodSpec:
    """A method's name, a one-line summary and its options in `Config` order."""

    name: str
    summary: str
    options: tuple[Option, ...] = ()
    rules: tuple[Rule, ...] = field(default=())

    def option(self, name: str) -> Option | None:
        """The option called `name`, if the method has one."""
        return next((o for o in self.options if o.name == name), None)

    def defaults(self) -> dict[str, Any]:
        """Every option at its default."""
        return {o.name: o.default for o in self.options}

    def check(self, options: Mapping[str, Any]) -> list[OptionProblem]:
        """Every problem with `options` (empty when the method admits them)."""
        problems: list[OptionProblem] = []
        for name, value in options.items():
            option = self.option(name)
            if option is None:
                known = [o.name for o in self.options]
                problems.append(OptionProblem(name, f"unknown option of {self.name}; known: {known}"))
                continue
            why = option.problem(value)
            if why is not None:
                problems.append(OptionProblem(name, why))
        if not problems:
            merged = {**self.defaults(), **options}
            for rule in self.rules:
                if not rule.holds(merged):
                    problems.append(OptionProblem(rule.options[0], rule.description, rule=True))
        return problems

    def json_schema(self) -> dict[str, Any]:
        """`method_options` for this method as a JSON Schema: known options only."""
        schema: dict[str, Any] = {
            "type": "object",
            "title": f"{self.name} options",
            "properties": {o.name: o.json_schema() for o in self.options},
            "additionalProperties": False,
        }
        if self.rules:
            schema["description"] = "Also: " + "; ".join(r.description for r in self.rules) + "."
        return schema


@dataclass(frozen=True)
class OptionProblem:
    """One refused option: its name and why (`rule`: a constraint between options)."""

    option: str
    message: str
    rule: bool = False


def _positive(name: str, type_: OptionType, default: Any, maximum: float, description: str = "") -> Option:
    return Option(name, type_, default, description, exclusive_minimum=0, maximum=maximum)


def _count(name: str, default: int | None, description: str = "", *, nullable: bool = False) -> Option:
    return Option(name, "integer", default, description, nullable=nullable, minimum=1, maximum=1_000_000)


def _batch(name: str, default: int, description: str = "") -> Option:
    return Option(name, "integer", default, description, minimum=1, maximum=65_536)


def _fraction(name: str, default: float, description: str = "") -> Option:
    return Option(name, "number", default, description, exclusive_minimum=0, maximum=1)


def _optimizer(default: str) -> Option:
    return Option("optimizer", "string", default, choices=OPTIMIZERS)


def _lr(default: float, name: str = "lr") -> Option:
    return _positive(name, "number", default, 10, "learning rate")


def _epochs(name: str, default: float, description: str = "") -> Option:
    return Option(name, "number", default, description, exclusive_minimum=0, maximum=1000)


def _momentum(default: float) -> Option:
    return Option("momentum", "number", default, minimum=0, exclusive_maximum=1)


def _weight_decay(default: float) -> Option:
    return Option("weight_decay", "number", default, minimum=0, maximum=1)


def _non_negative(name: str, default: float, maximum: float, description: str = "") -> Option:
    return Option(name, "number", default, description, minimum=0, maximum=maximum)


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "feature_constraint",
            "Feature constraint against a random teacher with adaptive loss balance (default)",
            (
                Option("balancer", "string", "dwa", "loss-balancing scheme", choices=BALANCERS),
                Option("feature_loss", "string", "mse", choices=FEATURE_LOSSES),
                _fraction("recovery_fraction", 0.1, "share of the retain pool used for recovery"),
                _fraction("absent_recovery_fraction", 0.5, "that share when a whole class is gone "
                          "(in proportion to the forget samples whose class is gone)"),
                _count("recovery_count", None, "a fixed recovery subset size instead", nullable=True),
                _batch("batch_size", 64),
                _batch("forget_batch_size", 128),
                _optimizer("sgd"),
                _lr(0.001),
                _positive("absent_lr_factor", "number", 3.0, 100,
                          "learning rate factor for a whole class gone (lr * factor ** absent fraction)"),
                _momentum(0.9),
                _epochs("max_epochs", 5.0),
                Option("min_steps", "integer", 3, "updates before a stop or a selection",
                       minimum=1, maximum=1_000_000),
                Option("early_stop", "boolean", True),
                _non_negative("tolerance", 0.01, 1),
                _count("heldout_probe", 256),
                _non_negative("stall_ratio", 0.75, 1),
                _non_negative("max_pressure", 4.0, 1000),
                _non_negative("budget_floor", 0.25, 1000,
                              "least budget for absent classes, in recipe training passes"),
                _non_negative("dampen_absent", 0.5, 1000,
                              "SSD dampening of an absent class before the run (0: off)"),
                _non_negative("dampen_max_drop", 0.05, 1,
                              "retained accuracy the dampening may cost"),
                Option("dampen_backoff", "integer", 3, "selections tried after the first, each "
                       "twice as strict, before dampening is given up", minimum=0, maximum=20),
                _count("dampen_full_samples", None, "training samples the dampening's importance "
                       "on the training set is estimated on (None: all)", nullable=True),
                _count("dampen_layers", None, "dampen only the parameters of the model's last "
                       "this many layers (None: all)", nullable=True),
                Option("per_sample_targets", "boolean", False,
                       "with the model's reference statistics, push forget samples that models "
                       "which never saw them misclassify down to their own expected score"),
                Option("target_margin", "number", None, "with per_sample_targets: push each "
                       "target only to max(its expected score, -this) (None: all the way)",
                       nullable=True, exclusive_minimum=0, maximum=100),
                _non_negative("recovery_logits", 0.3, 1000, "when a class is gone or targets are "
                              "pushed: weight of the recovery batch's squared logit distance "
                              "to the original's (linear past 24 logits), over the classes "
                              "still carried"),
                Option("match_accuracy", "boolean", False,
                       "stop only once the forget set is recognised no more often than "
                       "held-out samples of its classes"),
                Option("match_losses", "boolean", True,
                       "push forget losses up to the held-out losses at their ranks and stop "
                       "only when a KS test cannot tell them apart"),
                _count("match_losses_min", 50, "fewest forget samples of present classes for "
                       "match_losses"),
                Option("recovery_gate", "boolean", True,
                       "when a class is gone, recovery must also hold on retained samples the "
                       "recovery does not train on"),
                _non_negative("gate_tolerance", 0.01, 1, "retained accuracy the recovery gate may "
                              "find below the original's"),
                Option("recovery_lr", "number", None, "learning rate of recovery-only steps "
                       "(None: the run's)", nullable=True, exclusive_minimum=0, maximum=10),
                _positive("saliency_mask", "number", 1.0, 1, "fraction of the weights updated: "
                          "those where the forget loss's gradient is largest (1: all)"),
            ),
        ),
        MethodSpec(
            "retrain",
            "Exact unlearning: train from scratch with the model's recipe",
            (
                Option("seed_offset", "integer", 0, "train with the recipe's seed plus this "
                       "(another exact retraining: the noise floor of a gap)",
                       minimum=0, maximum=1_000_000),
            ),
        ),
        MethodSpec(
            "finetune",
            "Cross-entropy on the retain pool only",
            (
                _epochs("epochs", 1.0, "passes over the retain pool"),
                _lr(0.01),
                _optimizer("sgd"),
                _momentum(0.9),
                _weight_decay(0.0),
                _batch("batch_size", 64),
            ),
        ),
        MethodSpec(
            "neggrad_plus",
            "beta * CE(retain) - (1 - beta) * CE(forget)",
            (
                Option("beta", "number", 0.95, exclusive_minimum=0, exclusive_maximum=1),
                _epochs("epochs", 1.0, "passes over the retain pool"),
                _lr(0.01),
                _optimizer("sgd"),
                _momentum(0.9),
                _weight_decay(0.0),
                _batch("batch_size", 64),
                _batch("forget_batch_size", 64),
                _non_negative("l2_pull", 0.1, 1000, "pull toward the original weights"),
            ),
        ),
        MethodSpec(
            "bad_teacher",
            "KL distillation: a random teacher on the forget set, the original on the retain set",
            (
                _fraction("retain_fraction", 0.3),
                _positive("temperature", "number", 1.0, 1000),
                _lr(1e-4),
                _optimizer("adam"),
                Option("steps", "integer", 60, "optimisation steps", minimum=1, maximum=1_000_000),
                Option("epochs", "number", None, "passes instead of steps", nullable=True,
                       exclusive_minimum=0, maximum=1000),
                _batch("batch_size", 64),
            ),
        ),
        MethodSpec(
            "scrub",
            "Alternating max-KL steps on the forget set and min CE+KL steps on the retain set",
            (
                Option("epochs", "integer", 3, "SGDA epochs", minimum=1, maximum=1000),
                Option("max_epochs", "integer", 2, "epochs that start with a max pass",
                       minimum=0, maximum=1000),
                _lr(1e-3),
                _optimizer("sgd"),
                _momentum(0.9),
                _weight_decay(5e-4),
                _positive("temperature", "number", 4.0, 1000),
                _non_negative("gamma", 0.99, 1000, "weight of CE in min steps"),
                _non_negative("alpha", 0.001, 1000, "weight of KL in min steps"),
                _fraction("retain_fraction", 1.0, "share of the retain pool per min pass"),
                _batch("batch_size", 128),
                _batch("forget_batch_size", 32),
                Option("rewind", "boolean", True, "select the checkpoint on held-out error (+R)"),
            ),
            (
                Rule(
                    ("max_epochs", "epochs"),
                    "max_epochs must not exceed epochs",
                    lambda o: bool(o["max_epochs"] <= o["epochs"]),
                ),
            ),
        ),
        MethodSpec(
            "unsir",
            "Error-maximising noise: impair, then repair",
            (
                _batch("noise_batch_size", 32, "distinct noise images"),
                Option("noise_steps", "integer", 40, minimum=0, maximum=100_000),
                _lr(0.1, "noise_lr"),
                _non_negative("noise_lambda", 0.1, 1000),
                _positive("noise_ratio", "number", 0.5, 1000, "noise images per retain image"),
                _fraction("retain_fraction", 0.3),
                _lr(1e-4, "impair_lr"),
                _lr(1e-4, "repair_lr"),
                _non_negative("impair_epochs", 1.0, 1000),
                _non_negative("repair_epochs", 1.0, 1000),
                _optimizer("adam"),
                _batch("batch_size", 64),
            ),
        ),
        MethodSpec(
            "ssd",
            "Selective synaptic dampening (no training)",
            (
                _positive("alpha", "number", 5.0, 1e6, "selection weighting"),
                _positive("dampening", "number", 1.0, 1e6, "lambda"),
                _batch("batch_size", 64),
                _count("full_max_samples", None, "None: all of forget + retain", nullable=True),
            ),
        ),
    )
}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def check_method_options(method: str, options: Mapping[str, Any]) -> list[OptionProblem]:
    """Every problem with `options` for `method`; `KeyError` for an unknown method."""
    return METHODS[method].check(options)


def normalise_method_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """`options` with integer options given as integral numbers (JSON's `3.0`) made `int`, so
    the engine's configs receive the types they declare. Unknown names are left as they are
    (`check_method_options` refuses them)."""
    spec = METHODS.get(method)
    if spec is None:
        return dict(options)
    integers = {o.name for o in spec.options if o.type == "integer"}
    return {
        k: int(v) if k in integers and isinstance(v, float) and v.is_integer() else v
        for k, v in options.items()
    }
