"""The interface every continual strategy implements, and what it is given.

The stage loop (`continual/loop.py`) is the same for every strategy. At each training stage t it

1. asks the strategy for its training jobs (`plan`): which adapter to train, on which samples, starting from
   fresh weights or from what the adapter holds now;
2. for each job calls `before_job` (e.g. PESO freezes its anchor), trains with the strategy's `parameters`
   and `extra_loss` (e.g. PESO's proximal term), then `after_job`;
3. calls `after_stage` (e.g. LSAT picks its ensemble weight on validation), saves the strategy's adapters and
   state, and evaluates with `predict`.

A strategy is a small class overriding only what differs from "one adapter, trained on the current stage".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

import numpy as np
import torch
from pydantic import ConfigDict

from evolora.config import NoBoolForNumbers, RunConfig, TrainConfig
from evolora.data.prepare import Prepared
from evolora.data.samples import StagePools, draw
from evolora.models.llm import LoraLM
from evolora.tasks.base import Task

MAIN = "default"  # the adapter every strategy evaluates unless it says otherwise


class StrategyOptions(NoBoolForNumbers):
    """Options shared by all strategies; each strategy subclasses this with its own (true/false where a
    number is wanted is refused, as in the config: `lam: true` ran with lam 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


@dataclass
class TrainJob:
    """One adapter trained on one set of samples.

    `init`: `fresh` resets the adapter from the seed first; `inherit` continues from its current weights.
    `reset_tokens` (with `fresh`): the adapter's rows of added tokens (semantic IDs) go back to their initial
    values too; False starts new LoRA factors on the rows as trained so far (cumulative strategies, whose
    frozen past updates were learned with those rows).
    `shareable`: the result depends only on the samples, the seed and the configuration (fresh start, no
    regulariser), so runs of other strategies may reuse it instead of training it again.
    """

    adapter: str
    train_rows: np.ndarray
    valid_rows: np.ndarray
    init: str = "inherit"
    shareable: bool = False
    tag: str = ""
    reset_tokens: bool = True
    #: a job that trains another model than the run's backbone (RecLoRA's click model): its name in the
    #: record, the backbone and task it trains, its training settings and its validation batch size
    model: str = ""
    backbone: Any = None
    task: Any = None
    train: TrainConfig | None = None
    eval_batch_size: int | None = None

    @property
    def name(self) -> str:
        return self.tag or self.adapter


@dataclass
class StageContext:
    stage: int  # the training stage t (1-based)
    eval_stage: int
    pools: dict[int, StagePools]
    seed: int
    stage_dir: Path
    eval_rows: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    asked: str = ""  # what `predict` answers, when not the stage's evaluation (a bar's words: "scoring")

    @property
    def predicting(self) -> str:
        """What a bar over `predict` says it does."""
        return self.asked or f"evaluating stage {self.eval_stage}"


@dataclass
class PlainLora:
    """An adapter as plain LoRA factors, what `evolora export` writes: ΔW = scaling · B @ A for every module
    (PEFT's module names), with the added-token rows of the PEFT adapter `tokens_from`."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: float
    tokens_from: str = MAIN

    @property
    def rank(self) -> int:
        return next(iter(self.factors.values()))[0].shape[0]

    @classmethod
    def of(cls, lm: LoraLM, adapter: str) -> PlainLora:
        """A PEFT adapter of `lm` as it is (all of an evolora run's adapters share alpha / r)."""
        factors = {n: (a.detach().clone(), b.detach().clone()) for n, a, b in lm.lora_pairs(adapter)}
        return cls(factors, lm.lora.alpha / lm.lora.r, adapter)


@dataclass
class Env:
    """What a strategy works with: the model, the task and the run configuration, and the prepared data for
    strategies that read more than the samples (RecLoRA's click model)."""

    lm: LoraLM
    task: Task
    cfg: RunConfig
    prepared: Prepared | None = None


OptionsT = TypeVar("OptionsT", bound=StrategyOptions)


class Strategy(Generic[OptionsT]):
    """A continual strategy, typed by its options class (`Strategy[PesoOptions]`: `self.options.lam`)."""

    name: ClassVar[str]
    Options: ClassVar[type[StrategyOptions]] = StrategyOptions
    #: True when `predict` is the plain one (score with the main adapter), so predictions can be shared
    plain_predict: ClassVar[bool] = True
    #: False for a strategy that only trains the whole model (a conventional model runs it); True: it
    #: needs LoRA adapters (banks, merges, per-adapter outputs)
    needs_lora: ClassVar[bool] = True
    #: for a run recorded without an option (it did not exist yet) or with only the options given: the value
    #: that gives its behaviour of then, where today's default does not (a rerun of such a folder is then
    #: refused, and serving, exporting or updating it rebuilds it as it ran)
    former_defaults: ClassVar[dict[str, Any]] = {}

    @classmethod
    def as_recorded_before(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Recorded `options` with `former_defaults` where the record lacks them."""
        return {**cls.former_defaults, **options}

    @classmethod
    def check_config(cls, options: Any, cfg: RunConfig) -> None:
        """Refuse settings elsewhere in `cfg` this strategy cannot run with (a `ConfigError`), before any
        work starts: found at its set-up, the mistake came after every strategy listed before it had run."""

    @classmethod
    def unread(cls, options: dict[str, Any]) -> dict[str, str]:
        """Options among `options` that the others leave unread (none, but where a strategy says otherwise),
        each with the option that would read it."""
        return {}

    @classmethod
    def applicable(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The options that change what runs, given the others: two runs that differ only in an option that
        did not apply (`unread`) ran alike."""
        unread = cls.unread(options)
        return {k: v for k, v in options.items() if k not in unread}

    def __init__(self, options: OptionsT, env: Env, seed: int) -> None:
        self.options: OptionsT = options
        self.env = env
        self.lm = env.lm
        self.task = env.task
        self.cfg = env.cfg
        self.seed = seed
        #: set by the stage loop (`StageLoop.stored_predictions`): scores of an adapter holding a shared
        #: training result are computed once per row set for every run of the output folder
        self.prediction_store: Callable[[str, np.ndarray, Callable[[], Any]], tuple[Any, bool]] | None = None

    # ------------------------------------------------------------------ helpers for subclasses
    def budgeted(
        self, ctx: StageContext, stages: list[int], n_train: int | Literal["stage"] | None = "stage"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Training samples drawn from the train pools of `stages`, validation from the current stage.

        `n_train`: how many training samples: the current stage's budget (default), a count, or None for
        the whole pool. Draws are keyed by (seed, current stage), so strategies with the same seed drawing as
        many samples from the same stages get the same ones, and their fresh-adapter jobs train once.
        """
        train = np.concatenate([ctx.pools[s].train for s in stages])
        valid = ctx.pools[ctx.stage].valid
        t = ctx.stage
        n = self.cfg.train.budget(t) if n_train == "stage" else n_train
        return (
            draw(train, n, self.seed, t, salt=0),
            draw(valid, self.cfg.train.budget(t, valid=True), self.seed, t, salt=1),
        )

    def adapter_predictions(self, adapter: str, rows: np.ndarray, desc: str) -> Any:
        """The task's predictions of one adapter alone on `rows` (stored ones where the stage loop has them:
        LSAT's adapters are shared training results, scored once for all its variants and `retrain`)."""

        def compute() -> Any:
            self.lm.activate(adapter, trainable=False)
            return self.task.predict(self.lm, rows, self.cfg.eval.batch_size, desc=desc)

        if self.prediction_store is None:
            return compute()
        return self.prediction_store(adapter, rows, compute)[0]

    def current_stage_job(self, ctx: StageContext, adapter: str = MAIN, init: str = "inherit") -> TrainJob:
        train, valid = self.budgeted(ctx, [ctx.stage])
        fresh = init == "fresh"
        return TrainJob(adapter, train, valid, init, shareable=fresh and not self.regularized(ctx.stage))

    # ------------------------------------------------------------------ the interface
    def setup(self) -> None:
        """Called once after the model is built (add adapters, layers, parameters)."""

    def plan(self, ctx: StageContext) -> list[TrainJob]:
        """Training jobs of stage t. Default: the main adapter, fresh at stage 1, then inherited."""
        return [self.current_stage_job(ctx, init="fresh" if ctx.stage == 1 else "inherit")]

    def regularized(self, stage: int) -> bool:
        """Whether `extra_loss` is active at this stage (a regularised job is never shared)."""
        return False

    def before_job(self, ctx: StageContext, job: TrainJob) -> None:
        """Called after the job's adapter is initialised and activated, before training."""

    def parameters(self, job: TrainJob) -> list[torch.nn.Parameter]:
        """What the optimiser updates. Default: the LoRA weights of the job's adapter."""
        return self.lm.trainable_parameters()

    def extra_loss(self, job: TrainJob) -> torch.Tensor | None:
        """A term added to the task loss at every optimiser step (PESO, O-LoRA, ...)."""
        return None

    def after_job(self, ctx: StageContext, job: TrainJob, info: dict[str, Any]) -> None:
        """Called after training with the best epoch's weights in place (also when a finished job is
        restored); `info` is the job's record (`best_valid`, `train_seconds`, ...)."""

    def job_state(self, job: TrainJob) -> dict[str, torch.Tensor]:
        """What the job trained beyond its adapter (strategy parameters: SD-LoRA's magnitudes, RecLoRA's
        banks and gates). The loop stores it with the job's adapter, in one atomic write, and hands it
        back to `load_job_state` when a finished job is restored."""
        return {}

    def load_job_state(self, job: TrainJob, state: dict[str, torch.Tensor]) -> None:
        pass

    def after_stage(self, ctx: StageContext) -> None:
        """Called after all jobs of the stage, before saving and evaluation."""

    def predict(self, ctx: StageContext, rows: np.ndarray) -> Any:
        """Predictions for evaluation rows. Default: the task's scores under the main adapter."""
        self.lm.activate(MAIN, trainable=False)
        return self.task.predict(self.lm, rows, self.cfg.eval.batch_size, desc=ctx.predicting)

    def plain_adapters(self) -> dict[str, PlainLora]:
        """The strategy's model as plain LoRA adapters (export). Default: the main adapter as it is."""
        return {"default": PlainLora.of(self.lm, MAIN)}

    def export_info(self) -> dict[str, Any]:
        """How the exported adapters combine, when there are several (LSAT's ensemble weight)."""
        return {}

    def use_task(self, task: Task) -> None:
        """Predict for another table of samples from now on (the same task over new samples: inference)."""
        self.task = task

    def adapters_to_save(self) -> list[str]:
        """Adapters that make up this strategy's state after a stage (saved in PEFT format)."""
        return [MAIN]

    def state(self) -> dict[str, Any]:
        """Anything else needed to resume the chain from a saved stage (tensors, numbers)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass

    def stage_info(self) -> dict[str, Any]:
        """Extra numbers for the stage record (chosen ensemble weights, ...)."""
        return {}

    def teardown(self) -> None:
        """Undo what `setup` attached to the shared model (hooks), so the next run starts clean."""


def options_with_defaults(cls: type[Strategy], options: dict[str, Any]) -> dict[str, Any]:
    """A strategy's options with every default filled in, so `{lam: 2.0}` and `{}` compare equal for PESO;
    as written when they no longer validate (options of an older evolora)."""
    try:
        return cls.Options.model_validate(options).model_dump(mode="json")
    except Exception:
        return dict(options)
