"""PESO: a proximal regulariser that holds the evolving LoRA near its previous stage (Yoo et al., ICLR'26).

One LoRA adapter evolves through the stages, as in `finetune`. From stage 2 on, the loss gains

    lambda * sum_g KL( softmax(v_t^g) || softmax(v_{t-1}^g) )

where g runs over the groups of LoRA weights, one group being the flattened A or the flattened B of one
adapted module, and v_{t-1} is a frozen copy of the adapter as it left stage t-1. Locally the KL is half the
softmax(v_{t-1}^g)-weighted variance of the change, so it resists *reshuffling* a module's weights more than
uniform drift (spec §4.1, Prop. 3).

Options (paper vs released code, spec §4.2 and §8):

* `reduction`: `sum` over all 2M groups (the paper's formula, default) or `mean` over the M modules of
  (KL_A + KL_B) (the released code, whose lambda = 2 was tuned with that normalisation).
* `penalty`: `kl` (PESO), `l2` ((lambda/2) * sum_g ||v_t^g - v_{t-1}^g||^2, the paper's L2 proximal
  ablation) or `l2_norm` (sum_g ||v_t^g - v_{t-1}^g||_F, not squared, as the released code computes "L2").
* The KL term is computed in fp64 from fp64 copies of the anchor, outside autocast: in bf16 the
  log-ratios it sums (~1e-3) are below bf16's resolution and the term can vanish (spec §4.4), and even
  fp32 rounding (~1e-7 on log-probabilities near -8) exceeds the term itself (~1e-9 per group for a 0.1%
  change), which leaves its logged value noise. The L2 variants, free of that cancellation, run in fp32.

PESO's recipe also lowers the learning rate after stage 1 (0.1 x); set `train.lr_inherit` for that. Its
best epoch is chosen by a validation loss that includes the KL term; here, as for every strategy, by the
task's validation metric or loss alone (`train.select_by`), which the term (~1e-9 per group) hardly moves.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from evolora.continual.base import MAIN, StageContext, Strategy, StrategyOptions, TrainJob
from evolora.continual.regularizers import ProximalRegularizer


class PesoOptions(StrategyOptions):
    lam: float = Field(2.0, ge=0.0, description="regulariser weight lambda (paper grid 0.5-8; 0 = finetune)")
    penalty: Literal["kl", "l2", "l2_norm"] = "kl"
    reduction: Literal["sum", "mean"] = Field(
        "sum", description="sum over groups (paper) or mean over modules"
    )


class Peso(Strategy[PesoOptions]):
    name = "peso"
    Options = PesoOptions

    def setup(self) -> None:
        self.lam = self.options.lam
        self.regularizer = ProximalRegularizer(self.options.penalty, self.options.reduction)

    def regularized(self, stage: int) -> bool:
        return stage > 1 and self.lam > 0

    def before_job(self, ctx: StageContext, job: TrainJob) -> None:
        if self.regularized(ctx.stage):
            # The adapter holds stage t-1's result here (the loop restores it before a resumed epoch).
            self.regularizer.set_anchor(self.lm.lora_pairs(MAIN))

    def extra_loss(self, job: TrainJob) -> torch.Tensor | None:
        return self.lam * self.regularizer(self.lm.lora_pairs(MAIN))
