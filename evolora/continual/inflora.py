"""InfLoRA: interference-free low-rank adaptation (Liang & Li, CVPR'24), in the cumulative-LoRA frame.

Earlier stages' adapters are frozen and summed as they are. For a new stage, the new adapter's A is not
learned: its rows are the top-r principal directions of the new stage's layer inputs *after projecting out*
the input subspace of the earlier stages, and only B is trained. An update B A then leaves every input that
lies in the old subspace unchanged, so it does not interfere with what earlier stages learned.

The old subspace of each adapted layer is kept as an orthonormal basis U, grown after every stage with
the directions needed to explain `energy` of that stage's input energy (the gradient-projection-memory
rule InfLoRA builds on). Input statistics come from teacher-forced forward passes over the stage's training
samples, prompt and answer, as the model sees them in training (padding positions included, the shared
prompt prefix once per pass), in passes of `stats_batch` samples; they are accumulated and decomposed in
fp64 outside autocast, whatever the run's precision.

At stage 1, as the paper and the authors' code do from the first task on, A is designed from the stage's
inputs (no old subspace yet: their top-r principal directions) and only B learns (`first_stage: designed`).
`first_stage: plain` trains a plain LoRA at stage 1 instead, shared with the other strategies, the
interference-free design starting at stage 2: PESO's frame, where every method starts from one D1 adapter
(PESO's release has no InfLoRA; evolora's default until 2026-12-04). `init: inherit` here means B starts
from the previous stage's B (A is always designed anew), `fresh` means B starts at zero as in InfLoRA.

The directions are ranked as the paper writes it, by the eigenvectors of P C P (P the projector off the old
subspace, C the inputs' second moment); the authors' code takes the SVD of P C, which ranks by C^2 and
scales A's rows by 1/sqrt(3), where here they are orthonormal (so B's steps act about sqrt(3) times more
strongly at the same learning rate).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from evolora import cost, parallel
from evolora.continual.base import MAIN, StageContext, TrainJob
from evolora.continual.cumulative import CumulativeLora, CumulativeOptions
from evolora.models.precision import without_autocast
from evolora.progress import task as progress_task


class InfLoraOptions(CumulativeOptions):
    init: Literal["inherit", "fresh"] = "fresh"
    first_stage: Literal["designed", "plain"] = Field(
        "designed",
        description="designed: A from stage 1's inputs, B trained (the paper); plain: a plain LoRA at "
        "stage 1, shared with the other strategies (PESO's frame)",
    )
    energy: float = Field(0.95, gt=0.0, lt=1.0, description="share of input energy the old subspace keeps")
    stats_samples: int | None = Field(
        64, gt=0, description="samples for input statistics; null: training set"
    )
    stats_batch: int = Field(
        16,
        ge=1,
        description="samples per forward pass of the input statistics (their sums include the padding and "
        "count the shared prompt prefix once per pass, so they depend on it); eval.batch_size, whose default "
        "16 is this one's, set it until 2026-12-05",
    )


def update_basis(basis: torch.Tensor | None, cov: torch.Tensor, energy: float, max_dim: int) -> torch.Tensor:
    """Grow an orthonormal basis [d, k] so it explains `energy` of the input energy described by `cov`.

    Computed in fp64; returned in `cov`'s dtype."""
    out_dtype = cov.dtype
    cov = cov.double()
    d = cov.shape[0]
    total = torch.trace(cov).clamp_min(1e-12)
    if basis is None:
        basis = cov.new_zeros(d, 0)
    basis = basis.to(cov.dtype)
    proj = torch.eye(d, dtype=cov.dtype, device=cov.device) - basis @ basis.T
    residual = proj @ cov @ proj
    explained = total - torch.trace(residual)
    with without_autocast():
        vals, vecs = torch.linalg.eigh(residual)
    vals, vecs = vals.flip(0).clamp_min(0), vecs.flip(1)
    k = 0
    while explained / total < energy and k < len(vals) and basis.shape[1] + k < max_dim:
        explained = explained + vals[k]
        k += 1
    return torch.cat([basis, vecs[:, :k]], dim=1).to(out_dtype)


def designed_a(basis: torch.Tensor | None, cov: torch.Tensor, rank: int) -> torch.Tensor:
    """[r, d]: the top-r principal directions of the inputs outside span(basis) (fp64 inside, `cov`'s dtype
    out)."""
    out_dtype = cov.dtype
    cov = cov.double()
    d = cov.shape[0]
    proj = torch.eye(d, dtype=cov.dtype, device=cov.device)
    if basis is not None and basis.shape[1]:
        basis = basis.to(cov.dtype)
        proj = proj - basis @ basis.T
    with without_autocast():
        _, vecs = torch.linalg.eigh(proj @ cov @ proj)
    top = vecs.flip(1)[:, :rank]
    # An eigenvector's sign is arbitrary and flips under rounding-level changes of `cov` (a sum taken in
    # another order, e.g. across processes): fix it, largest entry positive. B learns from zero, so the
    # sign never changed the trained product B·A, only its rounding.
    peak = top.abs().argmax(dim=0)
    signs = torch.sign(top[peak, torch.arange(top.shape[1], device=top.device)])
    return (top * torch.where(signs == 0, 1.0, signs)).T.contiguous().to(out_dtype)


class InfLora(CumulativeLora[InfLoraOptions]):
    name = "inflora"
    Options = InfLoraOptions
    normalize_past = False
    former_defaults: ClassVar[dict[str, Any]] = {"first_stage": "plain"}  # until 2026-12-04

    def setup(self) -> None:
        super().setup()
        self.basis: dict[str, torch.Tensor | None] = {name: None for name, _, _ in self.lm.lora_pairs(MAIN)}

    def input_covariances(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Second moments E[x x^T] (fp64) of every adapted layer's inputs over the rows' training sequences.

        The sequences are the ones training sees (prompt and answer, teacher forced, `task.loss`), not the
        inputs of decoding: for next-item, beam search would feed the layers its own partial IDs instead.
        """
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        handles = []
        for name, module in self.lm.lora_layers():
            if MAIN not in module.lora_A:
                continue

            def hook(mod: Any, args: tuple[Any, ...], out: Any, name: str = name) -> None:
                with without_autocast():  # the hook runs inside the forward pass's autocast region
                    x = args[0].detach().double().reshape(-1, args[0].shape[-1])
                    xx = x.T @ x
                sums[name] = sums[name] + xx if name in sums else xx
                counts[name] = counts.get(name, 0) + x.shape[0]

            handles.append(module.register_forward_hook(hook))
        was_training = self.lm.model.training
        self.lm.model.eval()  # no dropout: the statistics of the layers' actual inputs
        batch = self.options.stats_batch  # not eval.batch_size: a setting that changes no other number
        # In a multi-process launch each process takes every N-th batch (summed below): the batches, and so
        # the padded positions the statistics include, stay those of one process.
        starts = list(range(0, len(rows), batch))[parallel.rank() :: parallel.world_size()]
        # Under FSDP a process with one batch fewer runs one more, uncounted, to keep the others in step.
        idle = parallel.forwards_in_step(len(starts)) - len(starts)
        try:
            with (
                torch.no_grad(),
                progress_task("input statistics", total=len(rows)) as bar,
                cost.part("inflora_statistics"),
            ):
                for start in starts:
                    self.task.loss(self.lm, rows[start : start + batch])
                    bar.advance(len(rows[start : start + batch]))
                if idle:  # hooks off (removing a handle twice is harmless): these rows are not counted
                    for h in handles:
                        h.remove()
                    for _ in range(idle):
                        self.task.loss(self.lm, rows[:1])
        finally:
            self.lm.model.train(was_training)
            for h in handles:
                h.remove()
        if parallel.active():
            for name, module in self.lm.lora_layers():
                if MAIN in module.lora_A and name not in sums:  # this process had no rows
                    d = module.lora_A[MAIN].in_features
                    sums[name], counts[name] = (
                        torch.zeros(d, d, dtype=torch.float64, device=self.lm.device),
                        0,
                    )
            names = sorted(sums)
            n = torch.tensor([float(counts[k]) for k in names], dtype=torch.float64)
            parallel.all_reduce_sum([sums[k] for k in names] + [n])
            counts = dict(zip(names, n.tolist(), strict=True))
        return {n: sums[n] / counts[n] for n in sums}

    def _stats_rows(self, ctx: StageContext) -> np.ndarray:
        rows = self.budgeted(ctx, [ctx.stage])[0]
        n = self.options.stats_samples
        return rows if n is None else rows[:n]

    def designs_a(self, stage: int) -> bool:
        return stage > 1 or self.options.first_stage == "designed"

    def plan(self, ctx: StageContext) -> list[TrainJob]:
        jobs = super().plan(ctx)
        if ctx.stage == 1 and self.designs_a(1):  # a designed A is InfLoRA's own: never a shared result
            jobs = [replace(job, shareable=False) for job in jobs]
        return jobs

    def before_job(self, ctx: StageContext, job: TrainJob) -> None:
        if not self.designs_a(ctx.stage):
            return
        covs = self.input_covariances(self._stats_rows(ctx))
        with torch.no_grad():
            for name, a, b in self.lm.lora_pairs(MAIN):
                a.copy_(designed_a(self.basis[name], covs[name].to(a.device), a.shape[0]))
                if self.options.init == "fresh" or ctx.stage == 1:
                    b.zero_()
                a.requires_grad_(False)  # only B learns

    def after_stage(self, ctx: StageContext) -> None:
        covs = self.input_covariances(self._stats_rows(ctx))
        opts = self.options
        for name, a, _ in self.lm.lora_pairs(MAIN):
            d = a.shape[1]
            self.basis[name] = update_basis(
                self.basis[name], covs[name].to(a.device), opts.energy, d - a.shape[0]
            )

    def state(self) -> dict[str, Any]:
        return {
            **super().state(),
            "basis": {n: None if u is None else u.cpu() for n, u in self.basis.items()},
        }

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.basis = {n: None if u is None else u.to(self.lm.device) for n, u in state["basis"].items()}

    def stage_info(self) -> dict[str, Any]:
        dims = [u.shape[1] for u in self.basis.values() if u is not None]
        return {**super().stage_info(), "old_subspace_dims_mean": float(np.mean(dims)) if dims else 0.0}
