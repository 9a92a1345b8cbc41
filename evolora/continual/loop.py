"""The stage loop: one loop for every strategy and every task.

For each training stage t the loop runs the strategy's jobs, saves what the strategy needs to continue,
evaluates on the protocol's evaluation stage and writes a stage record; `results.json` is rebuilt after every
stage. Everything is written atomically and in an order that makes a rerun continue where a killed run
stopped:

    stage-t/checkpoints/<job>.pt   after every epoch  (resume inside a job)
    stage-t/jobs/<job>.json        a job finished     (its adapter is in stage-t/adapters/)
    stage-t/trained.json           all jobs + after_stage done, adapters and strategy state saved
    stage-t/predictions.npz        evaluation done
    stage-t/record.json            the stage is finished

Training jobs that depend only on data, seed and configuration (a fresh adapter without regulariser: every
strategy's first stage, retraining, LSAT's adapters) are stored once
and reused by other strategies and experiments in the same output folder (`<output_dir>/_shared/`), and so
are predictions of a shared adapter.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evolora.config import TrainConfig
from evolora.continual.base import MAIN, StageContext, Strategy, TrainJob
from evolora.data.samples import StagePools, draw, eval_stage_of, train_stages
from evolora.io import atomic_directory, atomic_write_bytes, atomic_write_json, read_json, stable_hash
from evolora.train.trainer import TrainResult, train_adapter

log = logging.getLogger("evolora.continual")


def rows_digest(rows: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]


@dataclass
class SharedStore:
    """Content-addressed training results and predictions, shared by all experiments in an output folder.

    A job's key covers everything its result depends on: data, staging, task and model settings
    (`context_key`), the training settings of its stage, the seed, the stage and the exact sample rows. So
    experiments that differ only in later stages (another `lr_inherit`, another strategy) reuse stage 1.
    """

    root: Path
    context_key: str  # hash of the settings that fix the samples and the model (everything but `train`)

    def job_key(self, job: TrainJob, seed: int, stage: int, train: TrainConfig) -> str:
        settings = train.for_job(job.init).model_dump(mode="json")
        settings.pop("lr_inherit", None)
        return stable_hash(
            {
                "ctx": self.context_key,
                "train": settings,
                "seed": seed,
                "stage": stage,
                "train_rows": rows_digest(job.train_rows),
                "valid_rows": rows_digest(job.valid_rows),
            },
            length=20,
        )

    def job_dir(self, key: str) -> Path:
        return self.root / "jobs" / key

    def predictions_file(self, adapter_key: str, rows: np.ndarray) -> Path:
        return self.root / "predictions" / f"{stable_hash([adapter_key, rows_digest(rows)], 20)}.npz"


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


class StageLoop:
    """Runs one strategy with one seed through all stages, resumably."""

    def __init__(
        self,
        strategy: Strategy,
        pools: dict[int, StagePools],
        run_dir: Path,
        shared: SharedStore | None,
        header: dict[str, Any],
    ) -> None:
        self.s = strategy
        self.lm = strategy.lm
        self.task = strategy.task
        self.cfg = strategy.cfg
        self.seed = strategy.seed
        self.pools = pools
        self.run_dir = run_dir
        self.shared = shared
        self.header = header
        # Which shared job produced each adapter's current weights (None: not reproducible elsewhere).
        self.adapter_keys: dict[str, str | None] = {}

    # ------------------------------------------------------------------ paths
    def stage_dir(self, t: int) -> Path:
        return self.run_dir / f"stage-{t}"

    def _eval_rows(self, t: int) -> tuple[np.ndarray, int]:
        e = eval_stage_of(t, self.cfg.protocol)
        rows = self.pools[e].test
        return draw(rows, self.cfg.eval.max_samples, self.cfg.eval.seed, e, salt=2), len(rows)

    # ------------------------------------------------------------------ saving and restoring the chain
    def _save_state(self, t: int) -> None:
        d = self.stage_dir(t)
        for name in self.s.adapters_to_save():
            self.lm.save_adapter(d / "adapters" / name, name)
        state = {"strategy": self.s.state(), "adapter_keys": self.adapter_keys}
        import io

        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(d / "state.pt", buf.getvalue())

    def restore_state(self, t: int) -> None:
        d = self.stage_dir(t)
        for name in self.s.adapters_to_save():
            self.lm.load_adapter(d / "adapters" / name, name)
        state = torch.load(d / "state.pt", map_location="cpu", weights_only=False)
        self.s.load_state(state["strategy"])
        self.adapter_keys = dict(state["adapter_keys"])

    # ------------------------------------------------------------------ one job
    def _run_job(self, ctx: StageContext, job: TrainJob) -> dict[str, Any]:
        d = self.stage_dir(ctx.stage)
        done_file = d / "jobs" / f"{job.name}.json"
        adapter_dir = d / "job-adapters" / job.name
        if done_file.is_file():
            self.lm.load_adapter(adapter_dir, job.adapter)
            info = read_json(done_file)
            self.adapter_keys[job.adapter] = info.get("shared_key")
            self.s.after_job(ctx, job)
            return info

        key = None
        if job.shareable and self.shared is not None:
            key = self.shared.job_key(job, self.seed, ctx.stage, self.cfg.train)
            shared_dir = self.shared.job_dir(key)
            if (shared_dir / "result.json").is_file():
                self.lm.load_adapter(shared_dir / "adapter", job.adapter)
                result = read_json(shared_dir / "result.json")
                info = self._job_info(job, result, shared_key=key, reused=True)
                self._finish_job(ctx, job, info, adapter_dir, done_file, key)
                log.info("stage %d, %s: reused a shared training result (%s)", ctx.stage, job.name, key[:8])
                return info

        if job.init == "fresh":
            self.lm.reset_adapter(job.adapter, seed=self.seed * 1000 + ctx.stage)
        self.lm.activate(job.adapter, trainable=True)
        self.s.before_job(ctx, job)
        torch.manual_seed(self.seed * 1000 + ctx.stage)  # dropout masks
        result: TrainResult = train_adapter(
            self.lm,
            self.task,
            self.s.parameters(job),
            job.train_rows,
            job.valid_rows,
            self.cfg.train.for_job(job.init),
            seed=self.seed * 1000 + ctx.stage,
            extra_loss=(lambda: self.s.extra_loss(job)) if self.s.regularized(ctx.stage) else None,
            checkpoint=d / "checkpoints" / f"{job.name}.pt",
            eval_batch_size=self.cfg.eval.batch_size,
            desc=f"stage {ctx.stage} {job.name}",
        )
        self.lm.activate(job.adapter, trainable=False)
        if key is not None and self.shared is not None:
            with atomic_directory(self.shared.job_dir(key)) as out:
                self.lm.save_adapter(out / "adapter", job.adapter)
                atomic_write_json(out / "result.json", result.to_dict())
        info = self._job_info(job, result.to_dict(), shared_key=key, reused=False)
        self._finish_job(ctx, job, info, adapter_dir, done_file, key)
        return info

    def _finish_job(
        self,
        ctx: StageContext,
        job: TrainJob,
        info: dict,
        adapter_dir: Path,
        done_file: Path,
        key: str | None,
    ) -> None:
        self.adapter_keys[job.adapter] = key
        self.s.after_job(ctx, job)
        self.lm.save_adapter(adapter_dir, job.adapter)
        atomic_write_json(done_file, info)
        (self.stage_dir(ctx.stage) / "checkpoints" / f"{job.name}.pt").unlink(missing_ok=True)

    @staticmethod
    def _job_info(job: TrainJob, result: dict, shared_key: str | None, reused: bool) -> dict[str, Any]:
        return {
            "job": job.name,
            "adapter": job.adapter,
            "init": job.init,
            "n_train": len(job.train_rows),
            "n_valid": len(job.valid_rows),
            "epochs_run": result["epochs_run"],
            "best_epoch": result["best_epoch"],
            "best_valid": result["best_value"],
            "train_seconds": result["train_seconds"],
            "history": result["history"],
            "shared_key": shared_key,
            "reused_shared_result": reused,
        }

    # ------------------------------------------------------------------ one stage
    def _predict(self, ctx: StageContext) -> tuple[np.ndarray, bool]:
        key = self.adapter_keys.get(MAIN)
        cache = None
        if self.s.plain_predict and key is not None and self.shared is not None:
            cache = self.shared.predictions_file(key, ctx.eval_rows)
            if cache.is_file():
                with np.load(cache) as z:
                    return self.task.load_predictions(z), True
        preds = self.s.predict(ctx, ctx.eval_rows)
        if cache is not None:
            _save_npz(cache, self.task.save_predictions(preds))
        return preds, False

    def run_stage(self, t: int) -> dict[str, Any]:
        d = self.stage_dir(t)
        eval_rows, n_eval_total = self._eval_rows(t)
        ctx = StageContext(t, eval_stage_of(t, self.cfg.protocol), self.pools, self.seed, d, eval_rows)
        self.task.before_stage(self.lm, t)
        jobs_info: list[dict[str, Any]] = []
        if (d / "trained.json").is_file():
            self.restore_state(t)
            jobs_info = read_json(d / "trained.json")["jobs"]
        else:
            for job in self.s.plan(ctx):
                jobs_info.append(self._run_job(ctx, job))
            self.s.after_stage(ctx)
            self._save_state(t)
            atomic_write_json(d / "trained.json", {"jobs": jobs_info, "stage_info": self.s.stage_info()})
        t0 = time.perf_counter()
        pred_file = d / "predictions.npz"
        reused_preds = False
        if pred_file.is_file():
            with np.load(pred_file) as z:
                preds = self.task.load_predictions(z)
        else:
            preds, reused_preds = self._predict(ctx)
            arrays = {
                **self.task.save_predictions(preds),
                "rows": eval_rows,
                "truth": self.task.truth(eval_rows),
            }
            _save_npz(pred_file, arrays)
        eval_seconds = time.perf_counter() - t0
        record = self._record(ctx, preds, jobs_info, n_eval_total, eval_seconds, reused_preds)
        atomic_write_json(d / "record.json", record)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in record["metrics"].items())
        log.info(
            "%s: trained on stage %d, evaluated on stage %d: %s (%d samples)",
            self.header.get("method", "?"),
            t,
            ctx.eval_stage,
            shown,
            len(eval_rows),
        )
        return record

    def _record(
        self,
        ctx: StageContext,
        preds: np.ndarray,
        jobs: list[dict[str, Any]],
        n_eval_total: int,
        eval_seconds: float,
        reused_preds: bool,
    ) -> dict[str, Any]:
        rows = ctx.eval_rows
        kinds = self.task.table.df["user_kind"].to_numpy()[rows]
        by_kind = {}
        for kind in ("active", "dormant", "new"):
            sel = kinds == kind
            if sel.any():
                by_kind[kind] = {"n": int(sel.sum()), **self.task.metrics(preds[sel], rows[sel])}
        trained = read_json(ctx.stage_dir / "trained.json")
        main = next((j for j in jobs if j["adapter"] == MAIN), jobs[0] if jobs else None)
        return {
            "train_stage": ctx.stage,
            "eval_stage": ctx.eval_stage,
            "n_train": main["n_train"] if main else 0,
            "n_valid": main["n_valid"] if main else 0,
            "n_eval": len(rows),
            "n_eval_total": n_eval_total,
            "eval_subsampled": len(rows) < n_eval_total,
            "trained": bool(jobs),
            "train_seconds": float(sum(j["train_seconds"] for j in jobs)),
            "eval_seconds": eval_seconds,
            "reused_shared_predictions": reused_preds,
            "metrics": self.task.metrics(preds, rows),
            "by_user_kind": by_kind,
            "strategy_info": trained.get("stage_info", {}),
            "jobs": jobs,
        }

    # ------------------------------------------------------------------ all stages
    def run(self, on_stage: Any = None) -> dict[str, Any]:
        stages = train_stages(self.cfg.protocol, self.task.table.n_stages)
        done = [t for t in stages if (self.stage_dir(t) / "record.json").is_file()]
        todo = [t for t in stages if t not in done]
        self.s.setup()
        if todo and todo[0] > 1:
            # The chain continues from the last finished stage's saved adapters and state.
            self.task.before_stage(self.lm, todo[0] - 1)
            self.restore_state(todo[0] - 1)
            log.info("resuming: stages %s already finished", done)
        for t in todo:
            self.run_stage(t)
            results = self.results()
            atomic_write_json(self.run_dir / "results.json", results)
            if on_stage is not None:
                on_stage(results)
        results = self.results()
        atomic_write_json(self.run_dir / "results.json", results)
        return results

    def results(self) -> dict[str, Any]:
        stages = train_stages(self.cfg.protocol, self.task.table.n_stages)
        records = [
            read_json(self.stage_dir(t) / "record.json")
            for t in stages
            if (self.stage_dir(t) / "record.json").is_file()
        ]
        summary: dict[str, dict[str, float]] = {"mean": {}}
        if records:
            for m in self.task.metric_names:
                vals = [r["metrics"][m] for r in records if not np.isnan(r["metrics"].get(m, np.nan))]
                summary["mean"][m] = float(np.mean(vals)) if vals else float("nan")
            summary["train_seconds"] = float(sum(r["train_seconds"] for r in records))  # type: ignore[assignment]
        return {
            **self.header,
            "complete": len(records) == len(stages),
            "stages": records,
            "summary": summary,
        }
