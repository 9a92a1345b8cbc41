"""Train one adapter on one stage's samples, keeping the best epoch on validation (by the validation loss
where the metric is undefined on the validation rows: `_validate`).

The loop is deliberately plain (AdamW, optional warmup and decay, gradient clipping, micro-batch
accumulation); a strategy changes training only through the parameters it hands in and the extra loss term
it adds (PESO's proximal term, O-LoRA's orthogonality loss, ...).

Memory options: `train.gradient_checkpointing` recomputes the LLM's layer activations in the backward pass
while the job trains, and an fp16 backbone (`precision: fp16`) trains with loss scaling (`GradScaler`): the
loss is multiplied before `backward` so small fp16 gradients do not underflow, and the gradients are divided
back before clipping and the optimiser step, which is skipped when they overflowed.

Data-parallel under `accelerate launch` (`parallel.py`): each micro-batch is the global batch, split across
the processes, and the gradients are summed before the step, so the steps are those of one process.

Resumable: after every epoch the parameters, optimiser, schedule, best state and history are written to
`checkpoint` atomically (safetensors + JSON, no pickle); a rerun with the same arguments continues after the
last finished epoch. A damaged checkpoint is set aside with a warning and the job starts again.

Past ~400 lines: one job's loop (resume, epochs, validation, selection, checkpoints) reads in order here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from evolora import cost, parallel
from evolora.config import TrainConfig
from evolora.errors import DamagedFileError, warn_once
from evolora.eval.metrics import NonFiniteScores, diverged
from evolora.io import load_state, save_state, set_aside
from evolora.models.backbone import Backbone
from evolora.progress import task as progress_task
from evolora.tasks.base import Task

log = logging.getLogger("evolora.train")

ExtraLoss = Callable[[], torch.Tensor | None]


@dataclass
class TrainResult:
    epochs_run: int
    best_epoch: int  # 0 = the starting weights were kept
    best_value: float | None
    train_seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    cost: dict[str, dict] = field(default_factory=dict)  # the job's parts, earlier sittings' included

    def to_dict(self) -> dict:
        return asdict(self)


def _schedule(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    warmup = int(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _validate(
    lm: Backbone, task: Task, rows: np.ndarray, cfg: TrainConfig, batch_size: int
) -> dict[str, float]:
    """Validation numbers for epoch selection; larger `score` is better whatever `select_by` is. Where the
    metric is undefined on the rows (AUC on one label, every epoch alike), the validation loss scores the
    epochs: else none would beat the starting weights, kept without a word."""
    if cfg.select_by == "loss":
        value = _valid_loss(lm, task, rows, batch_size)
        return {"valid_loss": value, "score": -value if math.isfinite(value) else -math.inf}
    try:
        metrics = task.metrics(task.predict(lm, rows, batch_size, desc="validating"), rows)
    except NonFiniteScores as e:
        # A diverged epoch is never the best one; the run goes on and says so.
        log.warning("validation: %s", e)
        return {f"valid_{task.primary_metric}": math.nan, "score": -math.inf}
    value = metrics[task.primary_metric]
    out = {f"valid_{k}": v for k, v in metrics.items()}
    if math.isnan(value):
        loss = _valid_loss(lm, task, rows, batch_size)
        out["valid_loss"] = loss
        out["score"] = -loss if math.isfinite(loss) else -math.inf
    else:
        out["score"] = value
    return out


def _validated(
    lm: Backbone, task: Task, rows: np.ndarray, cfg: TrainConfig, batch_size: int
) -> dict[str, float]:
    """`_validate` as a `validation` part, with what this epoch's validation took (`valid_seconds`, wall
    clock, and `valid_tokens`; the stage's part adds up every epoch's)."""
    record, spent = cost.measured(lambda: _validate(lm, task, rows, cfg, batch_size), "validation")
    record["valid_seconds"] = round(sum(p["seconds"] for p in spent.values()), 3)
    record["valid_tokens"] = int(sum(p["tokens"] for p in spent.values()))
    return record


def _valid_loss(lm: Backbone, task: Task, rows: np.ndarray, batch_size: int) -> float:
    """The task's training loss on the validation rows (mean per sample), without gradients."""
    lm.model.eval()
    losses = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            losses.append(float(task.loss(lm, batch)) * len(batch))
    return sum(losses) / len(rows)


@dataclass
class _Progress:
    """Where a job stands between epochs: what a checkpoint holds besides optimiser and schedule."""

    best_state: list[torch.Tensor]
    best_value: float = -math.inf
    best_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    epoch: int = 0  # the last finished epoch
    elapsed: float = 0.0
    cost: dict[str, dict] = field(default_factory=dict)  # parts spent up to `epoch` (`cost.since`)

    @property
    def stale(self) -> int:
        """Epochs since the best one."""
        return int(self.history[-1]["epoch"]) - self.best_epoch if self.history else 0


def train_adapter(
    lm: Backbone,
    task: Task,
    params: list[torch.nn.Parameter],
    train_rows: np.ndarray,
    valid_rows: np.ndarray,
    cfg: TrainConfig,
    seed: int,
    extra_loss: ExtraLoss | None = None,
    checkpoint: Path | None = None,
    eval_batch_size: int = 16,
    desc: str = "training",
) -> TrainResult:
    """Train `params` (the active adapter's weights, plus any strategy parameters) on `train_rows`."""
    if len(train_rows) == 0:
        raise ValueError("no training samples")
    if cfg.select_by == "auto":
        cfg = cfg.model_copy(update={"select_by": task.default_select_by})
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(math.ceil(len(train_rows) / cfg.batch_size) / cfg.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, steps_per_epoch * cfg.epochs))
    use_valid = cfg.select_by != "last" and len(valid_rows) > 0
    # Only an fp16 backbone says it needs loss scaling (`LoraLM.loss_scaling`).
    scaler = torch.amp.GradScaler(lm.device.type) if getattr(lm, "loss_scaling", False) else None

    started = cost.mark()
    progress = (
        _resume(checkpoint, params, optimizer, scheduler, desc, scaler) if checkpoint is not None else None
    )
    if progress is not None:
        cost.carry(progress.cost)  # the checkpointed epochs' time, spent in an earlier sitting
    else:
        progress = _Progress(_snapshot(params))
        if use_valid and cfg.keep_start_if_better:
            t0 = time.perf_counter()
            v = _validated(lm, task, valid_rows, cfg, eval_batch_size)
            progress.elapsed += time.perf_counter() - t0
            progress.best_value = v["score"]
            progress.history.append({"epoch": 0, **v})

    warned = False  # that the validation metric is undefined (once a job)
    for epoch in range(progress.epoch + 1, cfg.epochs + 1):
        if cfg.patience is not None and progress.stale >= cfg.patience:
            break
        t0 = time.perf_counter()
        with _checkpointing(lm, cfg.gradient_checkpointing), cost.part("training"):
            record = _train_epoch(
                lm, task, params, train_rows, cfg, seed, epoch, optimizer, scheduler, extra_loss, desc, scaler
            )
        if use_valid:
            record.update(_validated(lm, task, valid_rows, cfg, eval_batch_size))
            if cfg.select_by != "loss" and "valid_loss" in record and not warned:
                warned = True
                log.warning(
                    "%s: validation %s is undefined on its %d rows (one label?): epochs are chosen by the "
                    "validation loss", desc, task.primary_metric, len(valid_rows),
                )  # fmt: skip
            if record["score"] > progress.best_value:
                progress.best_value, progress.best_epoch = record["score"], epoch
                progress.best_state = _snapshot(params)
        else:
            progress.best_epoch, progress.best_state = epoch, _snapshot(params)
        record["seconds"] = time.perf_counter() - t0
        progress.elapsed += record["seconds"]
        progress.history.append(record)
        progress.epoch = epoch
        progress.cost = cost.since(started)
        log.info("%s epoch %d: %s", desc, epoch, _fmt(record))
        if checkpoint is not None:
            _save_checkpoint(checkpoint, params, optimizer, scheduler, progress, scaler)
    _restore(params, progress.best_state)
    lm.model.eval()
    if diverged(progress.history):
        log.warning(
            "%s: the training loss was not finite in every epoch (diverged); the %s weights are kept: lower "
            "train.lr", desc, "starting" if progress.best_epoch == 0 else f"epoch-{progress.best_epoch}",
        )  # fmt: skip
    value = None if not use_valid or progress.best_value == -math.inf else float(progress.best_value)
    if value is not None and cfg.select_by == "loss":
        value = -value
    elif any("valid_loss" in h for h in progress.history):  # the metric was undefined: it has no best value
        value = None
    return TrainResult(
        progress.epoch, progress.best_epoch, value, progress.elapsed, progress.history, cost.since(started)
    )


@contextlib.contextmanager
def _checkpointing(lm: Backbone, enabled: bool) -> Iterator[None]:
    """`train.gradient_checkpointing` around an epoch's training passes (validation keeps its caches)."""
    switch = getattr(lm, "gradient_checkpointing", None)
    if not enabled or switch is None:
        if enabled:
            warn_once(
                log,
                "no checkpointing",
                "train.gradient_checkpointing applies to LLM backbones; %s trains without it",
                type(lm).__name__,
            )
        yield
        return
    with switch():
        yield


def _train_epoch(
    lm: Backbone,
    task: Task,
    params: list[torch.nn.Parameter],
    train_rows: np.ndarray,
    cfg: TrainConfig,
    seed: int,
    epoch: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    extra_loss: ExtraLoss | None,
    desc: str,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """One pass over the shuffled training rows; the epoch's losses and learning rate."""
    lm.model.train()
    rng = np.random.default_rng([seed, epoch])
    if parallel.active():  # dropout masks of this process's rows: drawn apart from the other processes'
        torch.manual_seed(int(np.random.default_rng([seed, epoch, parallel.rank()]).integers(2**31)))
    order = rng.permutation(train_rows)
    task_sum, extra_sum, n_steps, seen = 0.0, 0.0, 0, 0
    # A step's rows are drawn as one batch of batch_size x grad_accum, then cut into micro-batches: the
    # step a larger batch would take, its rows grouped by length as that batch's would be.
    steps = _batches(order, cfg.batch_size * cfg.grad_accum, rng, task if cfg.group_by_length else None)
    with progress_task(f"{desc} epoch {epoch}/{cfg.epochs}", total=len(order)) as bar:
        for step in steps:
            group = [step[j : j + cfg.batch_size] for j in range(0, len(step), cfg.batch_size)]
            optimizer.zero_grad(set_to_none=True)
            n_group = sum(len(b) for b in group)
            for b in group:
                mine = b[parallel.share(len(b))]  # all of it in one process
                if len(mine) == 0:
                    if parallel.sharded():  # FSDP: the others' layers gather from this process too
                        _scaled(task.loss(lm, b[:1]) * 0.0, scaler).backward()
                    continue
                loss = task.loss(lm, mine) * (len(mine) / n_group)
                _scaled(loss, scaler).backward()
                task_sum += loss.item() * n_group  # batch mean x batch size
            parallel.sum_gradients(params)  # every process now holds the whole group's gradient
            # The regulariser depends on the parameters only: once per optimiser step.
            extra = extra_loss() if extra_loss is not None else None
            if extra is not None:
                _scaled(extra, scaler).backward()
                extra_sum += extra.item()
            if scaler is not None:
                scaler.unscale_(optimizer)  # clip the true gradients
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)  # skipped when a gradient overflowed; the scale then shrinks
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            n_steps += 1
            seen += n_group
            bar.advance(n_group)
            bar.info(f"loss {task_sum / seen:.4f}")
    return {
        "epoch": epoch,
        "train_loss": parallel.sum_number(task_sum) / len(order),
        "extra_loss": extra_sum / max(1, n_steps),
        "lr": scheduler.get_last_lr()[0],
    }


def _scaled(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> torch.Tensor:
    return scaler.scale(loss) if scaler is not None else loss


def _snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().to("cpu", copy=True) for p in params]


def _restore(params: list[torch.nn.Parameter], state: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, s in zip(params, state, strict=True):
            p.copy_(s.to(p.device, p.dtype))


def _batches(order: np.ndarray, batch: int, rng: np.random.Generator, task: Task | None) -> list[np.ndarray]:
    """Micro-batches of a shuffled epoch; with a task, samples of similar length share a batch.

    Lengths are sorted only within windows of 16 batches and the batches are shuffled again, so the
    epoch stays random while padding shrinks.
    """
    if task is None:
        return [order[i : i + batch] for i in range(0, len(order), batch)]
    window = batch * 16
    out = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        lengths = np.array([task.sample_length(int(r)) for r in chunk])
        chunk = chunk[np.argsort(-lengths, kind="stable")]
        out += [chunk[i : i + batch] for i in range(0, len(chunk), batch)]
    perm = rng.permutation(len(out))
    return [out[i] for i in perm]


def _resume(
    path: Path,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    desc: str,
    scaler: torch.amp.GradScaler | None = None,
) -> _Progress | None:
    """Continue from the checkpoint at `path`, or None when there is none or it is unusable: a damaged
    checkpoint (or one for other parameters) is set aside with a warning and the job starts again."""
    if not path.is_file():
        return None
    try:
        ck = load_state(path)
        shapes = [tuple(t.shape) for t in ck["params"]]
        if shapes != [tuple(p.shape) for p in params]:
            raise DamagedFileError(path, f"{path} holds other parameters than this job trains")
        _restore(params, ck["params"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        if scaler is not None and "scaler" in ck:
            scaler.load_state_dict(ck["scaler"])
        progress = _Progress(**{k: ck[k] for k in ("best_state", "best_value", "best_epoch", "history")})
        progress.epoch, progress.elapsed = ck["epoch"], ck["elapsed"]
        progress.cost = ck.get("cost", {})  # checkpoints from before the cost was kept have none
        torch.set_rng_state(ck["torch_rng"])  # dropout continues exactly as without the interruption
        if "cuda_rng" in ck and params[0].device.type == "cuda":  # on a GPU, its generator draws the masks
            torch.cuda.set_rng_state(ck["cuda_rng"], params[0].device)
    except (DamagedFileError, KeyError, TypeError, ValueError) as e:
        aside = set_aside(path)
        log.warning("%s: checkpoint unusable (%s); moved to %s, training restarts", desc, e, aside.name)
        return None
    log.info("%s: resuming after epoch %d", desc, progress.epoch)
    return progress


def _save_checkpoint(
    path: Path,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: _Progress,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    extra = {"scaler": scaler.state_dict()} if scaler is not None else {}
    if params and params[0].device.type == "cuda":  # a GPU's dropout masks come from its own generator
        extra["cuda_rng"] = torch.cuda.get_rng_state(params[0].device)
    save_state(
        path,
        {
            **extra,
            "params": _snapshot(params),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "best_state": progress.best_state,
            "best_value": progress.best_value,
            "best_epoch": progress.best_epoch,
            "history": progress.history,
            "epoch": progress.epoch,
            "elapsed": progress.elapsed,
            "cost": progress.cost,
            "torch_rng": torch.get_rng_state(),
        },
    )


def _fmt(record: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k not in ("epoch", "score"))
