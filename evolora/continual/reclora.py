"""RecLoRA: personalized LoRA from a meta-LoRA bank, routed by a conventional model (Zhu et al., 2024).

Few2Many: at every stage a DIN click model (the CRM) is first trained on the *whole* training pool of the
stage with a long ID history (`crm.max_len`, 60), then frozen; its hidden representation of each sample
(user, long history, target) feeds a soft gate per adapted projection, which mixes a bank of meta-LoRAs
into a per-sample adapter (`models/personalized.py`). The LLM side trains only the banks and gates, on the
small sample budget of the stage. The prompt's short history (10 items) can be retrieved from a longer one by
similarity to the target (`task.retrieve_from`): the Long-Short Modality Retriever.

As a continual strategy the banks, gates and CRM evolve across stages (each stage fine-tunes them),
optionally with PESO's proximal term on the bank factors (`proximal`). RecLoRA itself is not continual:
"lifelong" in its title means long behaviour sequences, not stage-wise updates (spec §6).

Paper vs released code (spec §2): `combine: factors` (code) aggregates A and B separately, so each sample's
adapter is a plain rank-r LoRA that can be exported (`export_user_adapter`); `combine: products` (the
formula third-party summaries give) sums the meta-LoRAs' updates. The code keeps the CRM's dropout active
while the LLM trains; here the frozen CRM runs in eval mode, so its representations are deterministic.
`few2many: false` trains the CRM on the LLM's few samples only (the ablation). The CRM's MLP is the
authors' DIN for ML-1M (spec §4: three hidden layers of 256, ReLU; the paper gives no layers); until
2026-12-04 it was 256-256 with PReLU (`crm: {mlp: [256, 256], activation: prelu}`), which the committed
reclora-ml100k tables ran and runs recorded then keep.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, SerializerFunctionWrapHandler, field_validator, model_serializer

from evolora import cost
from evolora.config import ConventionalConfig, ModelConfig, RunConfig, TrainConfig
from evolora.continual.base import MAIN, PlainLora, StageContext, Strategy, StrategyOptions, TrainJob
from evolora.continual.regularizers import ProximalRegularizer
from evolora.data.ids import known_form
from evolora.errors import ConfigError, EvoloraError
from evolora.models.personalized import PersonalizedLoRA
from evolora.tasks.base import Task

# RecLoRA's CRM: DIN over a long ID history of up to 60 items, its MLP three hidden layers of 256 with ReLU,
# as the authors' DIN for ML-1M (spec §4, `get_ctr_config`); evolora's DIN baseline keeps the paper's PReLU.
RECLORA_CRM = ConventionalConfig(max_len=60, mlp=(256, 256, 256), dropout=0.1, activation="relu")
# The CRM's MLP until 2026-12-04 (two layers, PReLU): what a run recorded without these keys ran with.
FORMER_CRM = {"mlp": [256, 256], "activation": "prelu"}


class RecLoraOptions(StrategyOptions):
    n_meta: int = Field(8, ge=1, description="meta-LoRAs per projection (the code runs 8-16)")
    temperature: float = Field(5.0, gt=0, description="softmax temperature of the gate (ML-1M: 5)")
    combine: Literal["factors", "products"] = "factors"
    gate_hidden: int = Field(60, ge=1)
    gate_dropout: float = Field(0.1, ge=0, lt=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    crm: ConventionalConfig = Field(
        RECLORA_CRM,
        description="the CRM's settings; those not given keep RecLoRA's (not model.conventional's)",
    )
    crm_epochs: int = Field(3, ge=1)
    crm_lr: float = Field(1e-3, gt=0)
    crm_batch_size: int = Field(256, ge=1)
    few2many: bool = Field(
        True, description="train the CRM on the whole stage pool (False: the LLM's samples)"
    )
    proximal: float = Field(0.0, ge=0, description="PESO's KL term on the bank factors across stages")

    @field_validator("crm", mode="before")
    @classmethod
    def _crm_over_reclora_defaults(cls, value: Any) -> Any:
        # A partial mapping ({dim: 8}) changes what it names; the rest stay RecLoRA's, not the generic ones.
        if isinstance(value, Mapping):
            return {**RECLORA_CRM.model_dump(), **value}
        return value

    @model_serializer(mode="wrap")
    def _crm_activation_written_out(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # The CRM's `activation` is recorded even at DIN's default (prelu, which a dump leaves out): a
        # record without it is a run from before the key, whose CRM ran prelu (`RecLora.as_recorded_before`).
        dumped = handler(self)
        if isinstance(dumped.get("crm"), dict):
            dumped["crm"]["activation"] = self.crm.activation
        return dumped


class RecLora(Strategy[RecLoraOptions]):
    name = "reclora"
    Options = RecLoraOptions
    plain_predict = False

    @classmethod
    def as_recorded_before(cls, options: dict[str, Any]) -> dict[str, Any]:
        # A record lacking crm (only the options given were recorded) or one of its MLP keys ran with the
        # CRM of then, not today's default.
        recorded = super().as_recorded_before(options)
        crm = recorded.get("crm")
        return {**recorded, "crm": {**FORMER_CRM, **(crm if isinstance(crm, Mapping) else {})}}

    @classmethod
    def check_config(cls, options: Any, cfg: RunConfig) -> None:
        if cfg.task.name != "ctr":
            raise ConfigError("reclora works on the ctr task (its gate reads a click model)")
        keep = cfg.task.history_kept()  # what every sample keeps (its table's history_len)
        if keep < options.crm.max_len:
            raise ConfigError(
                f"reclora's CRM reads {options.crm.max_len} history items but samples keep {keep}: set "
                f"task.sample_history: {options.crm.max_len}"
            )

    def setup(self) -> None:
        from evolora.models.conventional.backbone import ConventionalBackbone
        from evolora.tasks.conventional import ConventionalCtrTask

        o = self.o = self.options
        self.check_config(o, self.cfg)
        prepared = self.env.prepared
        if prepared is None:
            raise ConfigError("reclora needs the experiment's data (run it through `evolora run`)")
        space = prepared.id_space()
        crm_model = ModelConfig(name="din", device=self.cfg.model.device, conventional=o.crm)
        self.crm = ConventionalBackbone.from_config(crm_model, space, prepared.data.items, seed=self.seed)
        self.crm_task = ConventionalCtrTask(self.cfg.task, self.task.table, space, o.crm.max_len)
        lora = self.lm.lora  # the modules actually adapted (a family's own where q/v_proj are absent)
        self.personal = PersonalizedLoRA(
            self.lm,
            d_gate=o.crm.mlp[-1],
            target_modules=lora.target_modules,
            seed=self.seed,
            n_meta=o.n_meta,
            rank=lora.r,
            alpha=lora.alpha,
            dropout=o.lora_dropout,
            temperature=o.temperature,
            gate_hidden=o.gate_hidden,
            gate_dropout=o.gate_dropout,
            combine=o.combine,
        )
        self.lm.attach_per_sample("reclora", self.personal, self._route)
        self.z: torch.Tensor | None = None
        self.regularizer = ProximalRegularizer("kl")
        self.info: dict[str, Any] = {}

    # ------------------------------------------------------------------ routing
    def _route(self, rows: np.ndarray) -> None:
        if self.z is None:
            raise RuntimeError("the CRM has not produced gate inputs yet")
        self.personal.set_route(self.z[torch.as_tensor(np.asarray(rows, dtype=np.int64))])

    @torch.no_grad()
    @cost.timed("reclora_router")
    def _represent(self) -> None:
        """The frozen CRM's representation of every sample row, the gate's input."""
        model = self.crm.model
        model.eval()
        n = len(self.task.table)
        out = []
        for start in range(0, n, 2048):
            rows = np.arange(start, min(n, start + 2048))
            out.append(model.user_representation(self.crm_task.batch(rows, self.crm.device)).float().cpu())
        self.z = torch.cat(out) if out else torch.zeros(0, self.o.crm.mlp[-1])  # no samples (yet)

    # ------------------------------------------------------------------ the interface
    def plan(self, ctx: StageContext) -> list[TrainJob]:
        """Two jobs: the click model (Few2Many: on the whole stage pool), then the banks and gates on the
        stage's sample budget. Stage 1 trains new banks (at `train.lr`); later stages continue them (at
        `train.lr_inherit`). The PEFT adapter a fresh job resets stays at zero: only the banks add to the
        projections."""
        o = self.o
        train, valid = self.budgeted(ctx, [ctx.stage])
        crm_settings = TrainConfig(
            samples_per_stage=None, epochs=o.crm_epochs, batch_size=o.crm_batch_size, lr=o.crm_lr,
            select_by="metric", schedule="constant", group_by_length=False,
        )  # fmt: skip
        crm = TrainJob(
            "default", ctx.pools[ctx.stage].train if o.few2many else train, ctx.pools[ctx.stage].valid,
            tag="crm", model="crm", backbone=self.crm, task=self.crm_task, train=crm_settings,
            eval_batch_size=1024,
        )  # fmt: skip
        return [crm, TrainJob(MAIN, train, valid, init="fresh" if ctx.stage == 1 else "inherit")]

    def regularized(self, stage: int) -> bool:
        return stage > 1 and self.o.proximal > 0

    def _bank_pairs(self) -> list[tuple[str, torch.nn.Parameter, torch.nn.Parameter]]:
        return [(k, bank.A, bank.B) for k, bank in self.personal.banks.items()]

    def before_job(self, ctx: StageContext, job: TrainJob) -> None:
        if job.model == "crm":
            self.crm_task.before_stage(self.crm, ctx.stage)  # the ID tables grow to this stage's ids
            if ctx.stage == 1:
                self.crm.reset_adapter("default", seed=self.seed)
            self.crm.activate("default", trainable=True)
            return
        self.lm.activate(MAIN, trainable=False)  # the shared PEFT adapter stays at zero
        for p in self.personal.parameters():
            p.requires_grad_(True)
        if self.regularized(ctx.stage):
            self.regularizer.set_anchor(self._bank_pairs())

    def parameters(self, job: TrainJob) -> list[torch.nn.Parameter]:
        if job.model == "crm":
            return self.crm.trainable_parameters()
        return list(self.personal.parameters())

    def extra_loss(self, job: TrainJob) -> torch.Tensor | None:
        if job.model == "crm":
            return None
        return self.o.proximal * self.regularizer(self._bank_pairs())

    def after_job(self, ctx: StageContext, job: TrainJob, info: dict[str, Any]) -> None:
        if job.model == "crm":
            self.info = {
                "crm_train_rows": info["n_train"],
                "crm_valid_auc": info["best_valid"],
                "crm_seconds": info["train_seconds"],
            }
            self._represent()  # the frozen router's inputs for the banks' job

    def job_state(self, job: TrainJob) -> dict[str, torch.Tensor]:
        if job.model == "crm":
            return {}  # the click model's weights are the job's adapter
        return {f"personal.{k}": v for k, v in self.personal.state_dict().items()}

    def load_job_state(self, job: TrainJob, state: dict[str, torch.Tensor]) -> None:
        if job.model != "crm":
            self.personal.load_state_dict({k.removeprefix("personal."): v for k, v in state.items()})

    def plain_adapters(self) -> dict[str, PlainLora]:
        if self.o.combine != "factors":  # no per-user LoRA either: say so, not advise what refuses too
            raise EvoloraError(
                "reclora's adapter differs per sample, and with `combine: products` a sample's is no single "
                "LoRA: neither `export` nor `export-user-adapter` can write it (`combine: factors` can)"
            )
        raise EvoloraError(
            "reclora's adapter differs per sample (its router reads the user and the target): export one "
            "user's with `evolora export-user-adapter RUN_DIR USER`"
        )

    def use_task(self, task: Task) -> None:
        super().use_task(task)
        self.crm_task = self.crm_task.for_table(task.table)
        self._represent()  # the router's inputs for the new samples

    def state(self) -> dict[str, Any]:
        return {
            "personal": {k: v.cpu() for k, v in self.personal.state_dict().items()},
            "crm": self.crm.state(),
            "info": self.info,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.personal.load_state_dict(state["personal"])
        self.crm.load_state(state["crm"])
        self.info = state.get("info", {})
        self._represent()

    def stage_info(self) -> dict[str, Any]:
        return dict(self.info)

    def export_user_adapter(self, row: int, path: str | Path) -> None:
        """One sample's personalized adapter (its user, history and target) as a plain PEFT LoRA, alone:
        `evolora.export_user.export_user_adapter` (the CLI's) writes it with the sample, its prompt, the run's
        score and a README."""
        assert self.z is not None
        self.personal.export(self.z[row], path, self.cfg.model.revision)

    def export_for_user(self, user: str, path: str | Path, until_stage: int, item: str | None = None) -> int:
        """Export `user`'s adapter for the sample `user_row` picks and return that sample's row."""
        row = self.user_row(user, until_stage, item)
        self.export_user_adapter(row, path)
        return row

    def user_row(self, user: str, until_stage: int, item: str | None = None) -> int:
        """The row of `user`'s latest sample up to `until_stage` (with `item`: the latest sample whose target
        is `item`).

        The router reads the target too (DIN's attention is target-aware), so an adapter belongs to a
        (user, history, target) triple; the latest sample is the one the user was last scored on.
        """
        df = self.task.table.df
        # the ids as the run knows them (`known_form`: one copied with spaces at its ends is the run's)
        user = known_form(user, set(df["user_id"].cast(str).unique()))
        mask = (df["user_id"].cast(str) == user) & (df["stage"] <= until_stage)
        if item is not None:
            item = known_form(item, set(df["item_id"].cast(str).unique()))
            mask = mask & (df["item_id"].cast(str) == item)
        rows = np.flatnonzero(mask.to_numpy())
        if not len(rows):
            what = f"user {user!r}" + (f" with target item {item!r}" if item is not None else "")
            raise ConfigError(f"no sample of {what} up to stage {until_stage}")
        return int(rows[-1])

    def teardown(self) -> None:
        if not hasattr(self, "personal"):  # setup stopped early
            return
        self.personal.remove()
        self.lm.detach_per_sample("reclora", self._route)
