"""`retrain`: a fresh LoRA at every stage, trained on samples from all stages so far (LSAT's "Full
Retraining").

The sample budget is the same as the other strategies' (drawn from the union of the train pools of stages
1..t), so retraining is compared at equal training cost per stage, not with ever more data. Set
`train.samples_per_stage: null` to retrain on everything, as LSAT does.
"""

from __future__ import annotations

from evolora.continual.base import StageContext, Strategy, TrainJob


class Retrain(Strategy):
    name = "retrain"

    def plan(self, ctx: StageContext) -> list[TrainJob]:
        train, valid = self.budgeted(ctx, list(range(1, ctx.stage + 1)))
        return [TrainJob("default", train, valid, init="fresh", shareable=True)]
