"""`retrain`: exact unlearning by training from scratch on the retain pool with the model's
stored recipe. The gold standard every other method is measured against."""

from __future__ import annotations

from dataclasses import dataclass

from engine.methods.base import Method, MethodOutput, UnlearnContext
from engine.training import train_model


class Retrain(Method):
    name = "retrain"

    @dataclass(frozen=True)
    class Config:
        pass

    def run(self, ctx: UnlearnContext) -> MethodOutput:
        model, steps = train_model(
            ctx.arch, ctx.num_classes, ctx.data, ctx.retain_idx, ctx.recipe,
            reporter=ctx.reporter, phase="unlearning",
        )
        return MethodOutput(model=model, steps=steps)
