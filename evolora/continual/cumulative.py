"""Cumulative LoRA: earlier stages' adapters frozen into the model, a new adapter trained on top.

The common core of SumLoRA, SD-LoRA, InfLoRA and O-LoRA as PESO's analysis frames them (spec §5):

    W_t = W_0 + sum_{i<t} m_i * s * B_i A_i + s * B_t A_t

At the start of each stage from 2 on, the adapter as the previous stage left it is frozen into an
`AdapterBank`, and a new adapter is trained on the new stage. Two options span PESO's four variants of each
family:

* `past`: `all` keeps every earlier stage in the bank; `latest` only the most recent one.
* `init`: `inherit` starts the new adapter from the previous one's weights; `fresh` re-initialises it.

Stage 1 is plain LoRA (nothing to accumulate yet), so it is shared with every other strategy; InfLoRA
designs its A from stage 1 on unless `first_stage: plain`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Generic, Literal, TypeVar

import torch

from evolora.continual.base import MAIN, PlainLora, StageContext, Strategy, StrategyOptions, TrainJob
from evolora.models.bank import AdapterBank


class CumulativeOptions(StrategyOptions):
    past: Literal["all", "latest"] = "all"
    init: Literal["inherit", "fresh"] = "inherit"


CO = TypeVar("CO", bound=CumulativeOptions)


class CumulativeLora(Strategy[CO], Generic[CO]):
    Options = CumulativeOptions
    #: store past updates as Frobenius-normalised directions (SumLoRA, SD-LoRA) or as they are (O-LoRA)
    normalize_past: ClassVar[bool] = True
    #: learn one magnitude per module and past stage (SD-LoRA)
    learn_magnitudes: ClassVar[bool] = False

    def setup(self) -> None:
        self.bank = AdapterBank(self.lm, MAIN, self.past_normalization(), learnable=self.learn_magnitudes)

    def past_normalization(self) -> Literal["factors", "product"] | None:
        """How the bank normalises past updates (`AdapterBank`): A and B each, or not at all."""
        return "factors" if self.normalize_past else None

    def plan(self, ctx: StageContext) -> list[TrainJob]:
        if ctx.stage == 1:
            return [self.current_stage_job(ctx, init="fresh")]
        self.bank.push()
        if self.options.past == "latest":
            self.bank.keep_latest()
        train, valid = self.budgeted(ctx, [ctx.stage])
        # Never shared: the bank changes what the same adapter weights compute. A fresh start resets the
        # LoRA factors only: the banked updates were learned with the token rows as they are now.
        return [TrainJob(MAIN, train, valid, init=self.options.init, reset_tokens=False)]

    def parameters(self, job: TrainJob) -> list[torch.nn.Parameter]:
        return self.lm.trainable_parameters() + self.bank.magnitude_parameters()

    def current_magnitudes(self) -> dict[str, float]:
        """The magnitude the current adapter's update is applied at, per module (1 but for SD-LoRA)."""
        return {}

    def plain_adapters(self) -> dict[str, PlainLora]:
        """Past updates and the current adapter as one LoRA of rank (k + 1) r: the bank's A_i stacked over
        A_t and its m_i B_i beside B_t, at the adapter's scaling: s B A = sum_i m_i s B_i A_i + s B_t A_t."""
        current = self.current_magnitudes()
        factors = {}
        for name, a, b in self.lm.lora_pairs(MAIN):
            a, b = a.detach().float(), b.detach().float() * current.get(name, 1.0)
            bank = self.bank.banks[name]
            if bank.a is not None:
                mags = bank.magnitudes.detach().repeat_interleave(bank.rank)  # type: ignore[union-attr]
                a = torch.cat([bank.a, a], dim=0)
                b = torch.cat([bank.b * mags, b], dim=1)  # type: ignore[operator]
            factors[name] = (a.clone(), b.clone())
        return {"default": PlainLora(factors, self.lm.lora.alpha / self.lm.lora.r)}

    def state(self) -> dict[str, Any]:
        return {"bank": self.bank.state()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.bank.load_state(state["bank"])

    def stage_info(self) -> dict[str, Any]:
        return {"past_adapters": self.bank.size}

    def teardown(self) -> None:
        if hasattr(self, "bank"):  # else setup never ran (a check before it refused the run)
            self.bank.remove()
