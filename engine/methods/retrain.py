"""`retrain`: exact unlearning by training from scratch on the retain pool with the model's
stored recipe. The gold standard every other method is measured against."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from engine.errors import InvalidInput
from engine.methods.base import Method, MethodOutput, UnlearnContext
from engine.training import train_model


@dataclass(frozen=True)
class RetrainConfig:
    # Train with the recipe's seed plus this offset. 0 is the gold standard; another value
    # is an equally exact retraining that differs only in its random draws, so its gap to
    # the gold standard is the noise floor under every method's gap (`lethe bench --variant
    # 'retrain[seed+1]=retrain:{"seed_offset": 1}'`).
    seed_offset: int = 0

    def __post_init__(self) -> None:
        if self.seed_offset < 0:
            raise InvalidInput("seed_offset must be >= 0")


class Retrain(Method[RetrainConfig]):
    name = "retrain"
    Config = RetrainConfig

    def run(self, ctx: UnlearnContext) -> MethodOutput:
        recipe = dataclasses.replace(ctx.recipe, seed=ctx.recipe.seed + self.config.seed_offset)
        model, steps = train_model(
            ctx.arch, ctx.num_classes, ctx.data, ctx.retain_idx, recipe,
            reporter=ctx.reporter, phase="unlearning",
        )
        return MethodOutput(model=model, steps=steps)
