"""`frozen`: train a LoRA on D1 only and serve it unchanged afterwards (PESO's "Pretrain" row).

The lower bound every continual method must beat: it measures how fast a model goes stale.
"""

from __future__ import annotations

from evolora.continual.base import StageContext, Strategy, StrategyOptions, TrainJob


class Frozen(Strategy[StrategyOptions]):
    name = "frozen"
    needs_lora = False

    def plan(self, ctx: StageContext) -> list[TrainJob]:
        return [self.current_stage_job(ctx, init="fresh")] if ctx.stage == 1 else []
