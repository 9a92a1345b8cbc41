"""`retrain`: a fresh LoRA at every stage, trained on samples from all stages so far (LSAT's "Full
Retraining").

`budget: stage` (default) draws the current stage's sample budget from the union of the train pools of
stages 1..t, so retraining is compared at equal training cost per stage. A fresh adapter trained on a later
stage's small budget starts from nothing, though, so `budget: first` draws stage 1's budget instead: what it
takes to train an adapter from scratch (the same draw as LSAT-EN(full)'s long-term LoRA, so the two share
their training). Set `train.samples_per_stage: null` to retrain on everything, as LSAT does.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from evolora.continual.base import StageContext, Strategy, StrategyOptions, TrainJob


class RetrainOptions(StrategyOptions):
    budget: Literal["stage", "first"] = Field(
        "stage", description="training samples per stage: the stage's budget or stage 1's"
    )


class Retrain(Strategy[RetrainOptions]):
    name = "retrain"
    needs_lora = False
    Options = RetrainOptions

    def plan(self, ctx: StageContext) -> list[TrainJob]:
        first = self.options.budget == "first"
        n_train = self.cfg.train.budget(1) if first else "stage"
        train, valid = self.budgeted(ctx, list(range(1, ctx.stage + 1)), n_train)
        return [TrainJob("default", train, valid, init="fresh", shareable=True)]
