"""Engine test fixtures: the tiny memorisation problem (see `tiny_problem`)."""

from tiny_problem import one_thread, problem

__all__ = ["one_thread", "problem"]
