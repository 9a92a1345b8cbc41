"""O-LoRA: orthogonal subspace learning (Wang et al., EMNLP'23 Findings), in the cumulative-LoRA frame.

Earlier stages' adapters are frozen and summed as they are (not normalised), and the new adapter is pushed
into a subspace orthogonal to theirs by

    lam * sum over modules, past stages i of || A_i A_t^T ||_F^2

(A has shape r x d_in, so A_i A_t^T holds the inner products between the old and new input directions; it
is zero exactly when the row spaces are orthogonal). `include_b` adds the same term on the output side,
|| B_i^T B_t ||_F^2, as PESO's orthogonality ablation computes it. The term is computed in fp32, outside
autocast.
"""

from __future__ import annotations

import torch
from pydantic import Field

from evolora.continual.base import MAIN, TrainJob
from evolora.continual.cumulative import CumulativeLora, CumulativeOptions
from evolora.continual.regularizers import orthogonality_loss


class OLoraOptions(CumulativeOptions):
    lam: float = Field(0.5, ge=0.0, description="weight of the orthogonality loss (O-LoRA's lambda_1)")
    include_b: bool = False


class OLora(CumulativeLora[OLoraOptions]):
    name = "olora"
    Options = OLoraOptions
    normalize_past = False

    def regularized(self, stage: int) -> bool:
        return stage > 1 and self.options.lam > 0

    def extra_loss(self, job: TrainJob) -> torch.Tensor | None:
        total = torch.zeros((), device=self.lm.device)
        for name, a, b in self.lm.lora_pairs(MAIN):
            total = total + orthogonality_loss(self.bank.past_factors(name), a, b, self.options.include_b)
        return self.options.lam * total
