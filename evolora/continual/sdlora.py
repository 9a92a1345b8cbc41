"""SD-LoRA: decoupled magnitude and direction (Wu et al., ICLR'25), as PESO compares it (spec §5).

Like SumLoRA, past stages are frozen as Frobenius-normalised directions B^_i A^_i, but each gets a learnable
magnitude (one scalar per adapted module and past stage, initialised at 1), and the current adapter has a
learnable magnitude too. Only the directions of past stages are frozen.

PESO's released code rescales earlier adapters repeatedly in its `all` variant (spec §8.7); this
implementation applies each stored direction once.

`normalize`: the paper normalises each past update as a product, B_i A_i / ||B_i A_i||_F (`product`, the
default since 2026-12-04); PESO's frame and the SD-LoRA authors' code divide by ||A_i||_F ||B_i||_F instead
(`factors`, which makes ||B^_i A^_i||_F at most 1 and varying with the update's shape). The paper writes the
current component normalised too; like the authors' code, this leaves it unnormalised under its magnitude
(a new adapter's B = 0 has no direction). The defaults are `past: all`, `init: inherit` (PESO's
`sdlora_latest` is `past: latest`); the paper starts each task's LoRA afresh (`init: fresh`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from evolora.continual.base import MAIN, StageContext, TrainJob
from evolora.continual.cumulative import CumulativeLora, CumulativeOptions


class SdLoraOptions(CumulativeOptions):
    normalize: Literal["product", "factors"] = Field(
        "product", description="past directions: B_i A_i / ||B_i A_i|| (the paper) or A, B each (the code)"
    )


class SdLora(CumulativeLora[SdLoraOptions]):
    name = "sdlora"
    Options = SdLoraOptions
    learn_magnitudes = True
    former_defaults: ClassVar[dict[str, Any]] = {"normalize": "factors"}  # until 2026-12-04

    def past_normalization(self) -> Literal["factors", "product"] | None:
        return self.options.normalize

    def setup(self) -> None:
        super().setup()
        # The current adapter's magnitude: a hook scales each B output, so dropout etc. stay PEFT's own.
        self.current: dict[str, nn.Parameter] = {}
        self._handles = []
        for name, module in self.lm.lora_layers():
            if MAIN in module.lora_B:
                p = nn.Parameter(torch.ones((), device=self.lm.device))
                self.current[name] = p
                self._handles.append(module.lora_B[MAIN].register_forward_hook(self._scale(p)))

    @staticmethod
    def _scale(p: nn.Parameter):
        return lambda module, args, output: output * p.to(output.dtype)

    def plan(self, ctx: StageContext) -> list[TrainJob]:
        jobs = super().plan(ctx)
        if ctx.stage > 1:
            # super().plan() has banked the adapter as a direction of magnitude 1. The adapter the new stage
            # inherits keeps its learned magnitude folded into B, and its own magnitude starts again at 1.
            with torch.no_grad():
                for name, _, b in self.lm.lora_pairs(MAIN):
                    b.mul_(self.current[name])
                    self.current[name].fill_(1.0)
        return jobs

    def parameters(self, job: TrainJob) -> list[nn.Parameter]:
        # Stage 1 is plain LoRA (its result is shared with other strategies): no magnitudes before a bank.
        if self.bank.size == 0:
            return super().parameters(job)
        return super().parameters(job) + list(self.current.values())

    def current_magnitudes(self) -> dict[str, float]:
        return {n: float(p.detach()) for n, p in self.current.items()}

    def job_state(self, job: TrainJob) -> dict[str, torch.Tensor]:
        """The magnitudes the job trained: the current adapter's and the past directions'."""
        out = {f"current.{n}": p.detach() for n, p in self.current.items()}
        for n, bank in self.bank.banks.items():
            if bank.magnitudes is not None:
                out[f"past.{n}"] = bank.magnitudes.detach()
        return out

    def load_job_state(self, job: TrainJob, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.current.items():
                p.copy_(state[f"current.{n}"])
            for n, bank in self.bank.banks.items():
                if bank.magnitudes is not None:
                    bank.magnitudes.copy_(state[f"past.{n}"])

    def state(self) -> dict[str, Any]:
        return {**super().state(), "current": {n: p.detach().cpu() for n, p in self.current.items()}}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        with torch.no_grad():
            for n, v in state["current"].items():
                self.current[n].copy_(v)

    def teardown(self) -> None:
        super().teardown()
        for h in getattr(self, "_handles", []):  # none when setup never ran
            h.remove()
