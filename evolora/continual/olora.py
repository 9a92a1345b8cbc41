"""O-LoRA: orthogonal subspace learning (Wang et al., EMNLP'23 Findings), in the cumulative-LoRA frame.

Earlier stages' adapters are frozen and summed as they are (not normalised), and the new adapter is pushed
into a subspace orthogonal to theirs by

    lam * sum over modules, past stages i of || A_i A_t^T ||_F^2

(A has shape r x d_in, so A_i A_t^T holds the inner products between the old and new input directions; it
is zero exactly when the row spaces are orthogonal). `include_b` adds the same term on the output side,
|| B_i^T B_t ||_F^2, as PESO's orthogonality ablation computes it. The term is computed in fp32, outside
autocast.

As in the paper, each stage's adapter starts fresh (A random, B = 0: `init: fresh`); `init: inherit` starts
it from the previous stage's, PESO's variant of the cumulative family. The authors' released code
(cmnfriend/O-LoRA) differs from the paper in its loss, and offers it as options:
`penalty: abs` sums the absolute values of A_i A_t^T's entries instead of their squares, and `lam_l2` adds
its lambda_2 * sum of ||P||_F (not squared) over the new adapter's A and B (0 by default, as the paper has no
such term). Both terms apply from stage 2 on: stage 1 is the plain LoRA every strategy shares.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from evolora.continual.base import MAIN, TrainJob
from evolora.continual.cumulative import CumulativeLora, CumulativeOptions
from evolora.continual.regularizers import orthogonality_loss
from evolora.models.precision import without_autocast


class OLoraOptions(CumulativeOptions):
    init: Literal["inherit", "fresh"] = Field(
        "fresh", description="each stage's new adapter: re-initialised (the paper) or the previous one's"
    )
    lam: float = Field(0.5, ge=0.0, description="weight of the orthogonality loss (O-LoRA's lambda_1)")
    penalty: Literal["squared", "abs"] = Field(
        "squared", description="||A_i A_t^T||_F^2 (the paper) or the sum of its entries' |.| (authors' code)"
    )
    lam_l2: float = Field(
        0.0, ge=0.0, description="the authors' code's lambda_2: weight of sum ||P||_F over the new A and B"
    )
    include_b: bool = False


class OLora(CumulativeLora[OLoraOptions]):
    name = "olora"
    Options = OLoraOptions
    normalize_past = False
    former_defaults: ClassVar[dict[str, Any]] = {"init": "inherit"}  # until 2026-12-04

    def regularized(self, stage: int) -> bool:
        return stage > 1 and (self.options.lam > 0 or self.options.lam_l2 > 0)

    def extra_loss(self, job: TrainJob) -> torch.Tensor | None:
        o = self.options
        orthogonal = torch.zeros((), device=self.lm.device)
        norms = torch.zeros((), device=self.lm.device)
        for name, a, b in self.lm.lora_pairs(MAIN):
            orthogonal = orthogonal + orthogonality_loss(
                self.bank.past_factors(name), a, b, o.include_b, o.penalty
            )
            if o.lam_l2 > 0:
                with without_autocast():
                    norms = norms + a.float().norm() + b.float().norm()
        return o.lam * orthogonal + o.lam_l2 * norms
