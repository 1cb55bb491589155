"""`retrain`: exact unlearning by training from scratch on the retain pool with the model's
stored recipe. The gold standard every other method is measured against."""

from __future__ import annotations

from engine.methods.base import Method, MethodOutput, NoConfig, UnlearnContext
from engine.training import train_model


class Retrain(Method[NoConfig]):
    name = "retrain"

    def run(self, ctx: UnlearnContext) -> MethodOutput:
        model, steps = train_model(
            ctx.arch, ctx.num_classes, ctx.data, ctx.retain_idx, ctx.recipe,
            reporter=ctx.reporter, phase="unlearning",
        )
        return MethodOutput(model=model, steps=steps)
