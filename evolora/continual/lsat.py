"""LSAT: a long-term and a short-term LoRA, combined at inference (Shi et al., CIKM'24, arXiv 2312.15599).

* The short-term LoRA is trained from scratch on the newest stage only, every stage (Eq. 1).
* The long-term LoRA is trained on stages 1..m and then kept fixed ("LSAT(m)", Eq. 2); with
  `long_mode: full` it is retrained on all stages so far at every stage ("LSAT-EN (full)").
* Inference, chosen on the newest stage's validation samples over `grid`:
  - `ensemble` (LSAT-EN, Eq. 3): alpha * P_long + (1 - alpha) * P_short, two forward passes per sample;
  - `fusion` (LSAT-TA, Eq. 4): one adapter, lambda * long + (1 - lambda) * short, one forward pass.
    `fusion: factors` interpolates the LoRA parameters, A and B each, as Eq. 4 writes it (f(x; Phi,
    lambda Theta_h + (1 - lambda) Theta_t), Theta the LoRA weights, after the task arithmetic of its ref.
    [40]) and the released code does (rank r; the update then carries cross terms B_long·A_short).
    `fusion: delta`, evolora's variant in neither, interpolates the weight updates B·A instead (an exact mix
    of the two updates, rank 2r). Rows of added tokens (next-item's semantic IDs) are interpolated with the
    same weight. (Until 2026-12-04 `delta` was the default, wrongly said to be the paper's.)

The paper's grid is {0, 0.1, ..., 1}; the code's TA grid is {0.1, ..., 0.9}. Both adapters start from fresh
weights, so their training is shared with `retrain` and other runs through the loop's shared store. Like
`retrain`, the long-term LoRA draws its samples from the stages' training pools; the released code's also
trains on the earlier stages' validation rows (the last 10% of each). `fusion` applies to `inference:
fusion` only, `long_stages` to `long_mode: fixed` only.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from evolora import cost
from evolora.config import LoraConfig
from evolora.continual.base import MAIN, PlainLora, StageContext, Strategy, StrategyOptions, TrainJob

LONG = "long"
FUSED = "fused"


class LsatOptions(StrategyOptions):
    long_stages: int = Field(
        2, ge=1, description="m: the long-term LoRA learns stages 1..m, then stays fixed (paper: 10 of 20)"
    )
    long_mode: Literal["fixed", "full"] = "fixed"
    long_samples: int | None = Field(
        None, gt=0, description="training samples of the long-term LoRA; default: the stage-1 budget"
    )
    inference: Literal["ensemble", "fusion"] = "ensemble"
    fusion: Literal["factors", "delta"] = "factors"
    grid: list[Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=lambda: [round(0.1 * i, 1) for i in range(11)],
        min_length=1,
        description="the long-term adapter's weights w to choose from (w * long + (1 - w) * short), 0..1",
    )


def choose_weight(long: Any, short: Any, grid: list[float], score: Any) -> tuple[float, dict[float, float]]:
    """The grid weight w maximising score(w * long + (1 - w) * short); ties go to the first in the grid."""
    curve = {w: float(score(w, long, short)) for w in grid}
    best = max(grid, key=lambda w: (np.nan_to_num(curve[w], nan=-np.inf), -grid.index(w)))
    return best, curve


class Lsat(Strategy[LsatOptions]):
    name = "lsat"
    Options = LsatOptions
    former_defaults: ClassVar[dict[str, Any]] = {"fusion": "delta"}  # until 2026-12-04
    plain_predict = False

    @classmethod
    def unread(cls, options: dict[str, Any]) -> dict[str, str]:
        # `fusion` applies to inference: fusion only, `long_stages` to long_mode: fixed only
        out = {}
        if "fusion" in options and options.get("inference", "ensemble") != "fusion":
            out["fusion"] = "inference: fusion"
        if "long_stages" in options and options.get("long_mode", "fixed") == "full":
            out["long_stages"] = "long_mode: fixed"
        return out

    def setup(self) -> None:
        self.o = self.options
        self.weight: float | None = None
        self.curve: dict[float, float] = {}
        self.identical = False
        if LONG not in self.lm.adapters:
            self.lm.add_adapter(LONG)

    # ------------------------------------------------------------------ training
    def plan(self, ctx: StageContext) -> list[TrainJob]:
        t = ctx.stage
        jobs = [self.current_stage_job(ctx, MAIN, init="fresh")]
        if self.o.long_mode == "full" or t <= self.o.long_stages:
            budget = self.o.long_samples or self.cfg.train.budget(1)
            train, valid = self.budgeted(ctx, list(range(1, t + 1)), budget)
            # Same draw as `retrain` at equal budgets (and as the short-term job at stage 1): trained once.
            jobs.append(TrainJob(LONG, train, valid, "fresh", shareable=True))
        return jobs

    # ------------------------------------------------------------------ combining
    def _valid_rows(self, ctx: StageContext) -> np.ndarray:
        return self.budgeted(ctx, [ctx.stage])[1]

    def _scores(self, adapter: str, rows: np.ndarray, desc: str) -> Any:
        if adapter == FUSED:  # rebuilt for each weight: never a stored training result
            self.lm.activate(adapter, trainable=False)
            return self.task.predict(self.lm, rows, self.cfg.eval.batch_size, desc=desc)
        return self.adapter_predictions(adapter, rows, desc)

    def _pair(self, rows: np.ndarray, desc: str) -> tuple[Any, Any]:
        """Long- and short-term predictions on a common footing: for ranking tasks, both adapters score
        the union of the items either one ranked (the ensemble mixes their probabilities)."""
        long = self._scores(LONG, rows, f"{desc} (long-term)")
        short = self._scores(MAIN, rows, f"{desc} (short-term)")
        candidates = self.task.candidates([long, short])
        if candidates is None:
            return long, short
        rescored = []
        for adapter in (LONG, MAIN):
            self.lm.activate(adapter, trainable=False)
            rescored.append(self.task.rescore(self.lm, rows, candidates, self.cfg.eval.batch_size))
        return rescored[0], rescored[1]

    def build_fused(self, weight: float) -> None:
        """Write weight * long + (1 - weight) * short into the `fused` adapter: the LoRA update as `fusion`
        says, and the rows of added tokens (semantic IDs, next-item) interpolated the same way."""
        lora = self.lm.lora
        if self.o.fusion == "delta":
            # [w A_l; (1-w) A_s] and [B_l, B_s] multiply to w B_l A_l + (1-w) B_s A_s; doubling alpha with
            # the rank keeps PEFT's alpha / r scaling equal to the originals'.
            shape = LoraConfig(
                r=2 * lora.r, alpha=2 * lora.alpha, dropout=0.0, target_modules=lora.target_modules
            )
        else:
            shape = LoraConfig(r=lora.r, alpha=lora.alpha, dropout=0.0, target_modules=lora.target_modules)
        if FUSED not in self.lm.adapters:
            self.lm.add_adapter(FUSED, shape)
        long = {n: (a, b) for n, a, b in self.lm.lora_pairs(LONG)}
        short = {n: (a, b) for n, a, b in self.lm.lora_pairs(MAIN)}
        with torch.no_grad():
            for name, a_f, b_f in self.lm.lora_pairs(FUSED):
                (a_l, b_l), (a_s, b_s) = long[name], short[name]
                if self.o.fusion == "delta":
                    a_f.copy_(torch.cat([weight * a_l, (1 - weight) * a_s], dim=0))
                    b_f.copy_(torch.cat([b_l, b_s], dim=1))
                else:
                    a_f.copy_(weight * a_l + (1 - weight) * a_s)
                    b_f.copy_(weight * b_l + (1 - weight) * b_s)
            for layer in self.lm.token_layers():
                rows = layer.trainable_tokens_delta
                if FUSED in rows:
                    rows[FUSED].copy_(weight * rows[LONG] + (1 - weight) * rows[MAIN])

    def _same_adapters(self) -> bool:
        """Whether the long- and short-term adapters hold the same weights: at stage 1 (and whenever both
        train on one draw) they are one shared training result, so every weight gives the same model."""
        long, short = self.lm.adapter_state(LONG), self.lm.adapter_state(MAIN)
        return long.keys() == short.keys() and all(torch.equal(long[k], short[k]) for k in long)

    @cost.timed("lsat_search")
    def after_stage(self, ctx: StageContext) -> None:
        rows = self._valid_rows(ctx)
        metric = self.task.primary_metric
        self.identical = self._same_adapters()
        if self.identical:
            # Score once instead of once per grid weight; ties go to the first weight, as choose_weight does.
            value = self.task.metrics(self._scores(MAIN, rows, "validating"), rows)[metric]
            self.weight, self.curve = self.o.grid[0], {w: float(value) for w in self.o.grid}
            return
        if self.o.inference == "ensemble":
            long, short = self._pair(rows, "validating")

            def score(w: float, lo: Any, sh: Any) -> float:
                return self.task.metrics(self.task.mix([lo, sh], [w, 1 - w]), rows)[metric]

            self.weight, self.curve = choose_weight(long, short, self.o.grid, score)
        else:

            def score(w: float, lo: Any, sh: Any) -> float:
                self.build_fused(w)
                return self.task.metrics(self._scores(FUSED, rows, f"validating fusion {w}"), rows)[metric]

            self.weight, self.curve = choose_weight(None, None, self.o.grid, score)
            self.build_fused(self.weight)

    def predict(self, ctx: StageContext, rows: np.ndarray) -> Any:
        assert self.weight is not None, "after_stage chooses the weight first"
        desc = ctx.predicting
        if self.identical:
            return self._scores(MAIN, rows, desc)
        if self.o.inference == "fusion":
            self.build_fused(self.weight)
            return self._scores(FUSED, rows, desc)
        long, short = self._pair(rows, desc)
        return self.task.mix([long, short], [self.weight, 1 - self.weight])

    # ------------------------------------------------------------------ export
    def plain_adapters(self) -> dict[str, PlainLora]:
        """Fusion: the fused adapter (exact: rank 2r for `delta`). Ensemble: both adapters, combined at
        inference by `export_info`'s weight (no single LoRA equals an ensemble of outputs)."""
        if self.identical:
            return super().plain_adapters()
        if self.o.inference == "fusion":
            self.build_fused(self.weight)  # type: ignore[arg-type]
            return {"default": PlainLora.of(self.lm, FUSED)}
        return {"long": PlainLora.of(self.lm, LONG), "short": PlainLora.of(self.lm, MAIN)}

    def export_info(self) -> dict[str, Any]:
        if self.identical or self.o.inference == "fusion":
            return {}
        return {
            "ensemble": {"long": self.weight, "short": 1 - self.weight},  # type: ignore[operator]
            # the weighted mean of the two probabilities: P(like), or p(item | history) (mix_rankings)
            "mixes": "P(like)" if self.task.name == "ctr" else "p(item | history)",
        }

    # ------------------------------------------------------------------ state
    def adapters_to_save(self) -> list[str]:
        return [MAIN, LONG]

    def state(self) -> dict[str, Any]:
        return {"weight": self.weight, "curve": self.curve, "identical": self.identical}

    def load_state(self, state: dict[str, Any]) -> None:
        self.weight = state.get("weight")
        self.curve = state.get("curve", {})
        self.identical = state.get("identical", False)

    def stage_info(self) -> dict[str, Any]:
        key = "alpha" if self.o.inference == "ensemble" else "lambda"
        return {key: self.weight, f"valid_{self.task.primary_metric}_by_{key}": self.curve}
