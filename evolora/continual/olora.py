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
from evolora.models.precision import without_autocast


class OLoraOptions(CumulativeOptions):
    lam: float = Field(0.5, ge=0.0, description="weight of the orthogonality loss (O-LoRA's lambda_1)")
    include_b: bool = False


def orthogonality_loss(
    past: list[tuple[torch.Tensor, torch.Tensor]], a: torch.Tensor, b: torch.Tensor, include_b: bool
) -> torch.Tensor:
    """sum_i ||A_i A^T||_F^2 (+ ||B_i^T B||_F^2) for one module."""
    total = a.new_zeros((), dtype=torch.float32)
    with without_autocast():
        for a_i, b_i in past:
            total = total + (a_i.float() @ a.float().T).pow(2).sum()
            if include_b:
                total = total + (b_i.float().T @ b.float()).pow(2).sum()
    return total


class OLora(CumulativeLora):
    name = "olora"
    Options = OLoraOptions
    normalize_past = False

    def regularized(self, stage: int) -> bool:
        return stage > 1 and self.options.lam > 0  # type: ignore[attr-defined]

    def extra_loss(self, job: TrainJob) -> torch.Tensor | None:
        opts: OLoraOptions = self.options  # type: ignore[assignment]
        total = sum(
            orthogonality_loss(self.bank.past_factors(name), a, b, opts.include_b)
            for name, a, b in self.lm.lora_pairs(MAIN)
        )
        return opts.lam * total  # type: ignore[return-value]
