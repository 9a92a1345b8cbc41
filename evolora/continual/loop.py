"""The stage loop: one loop for every strategy and every task.

For each training stage t the loop runs the strategy's jobs, saves what the strategy needs to continue,
evaluates on the protocol's evaluation stage and writes a stage record; `results.json` is rebuilt after every
stage. Everything is written atomically and in an order that makes a rerun continue where a killed run
stopped:

    run.json                               the strategy and its options (a rerun must match them)
    stage-t/checkpoints/<job>.safetensors  after every epoch  (resume inside a job)
    stage-t/jobs/<job>/                    a job finished: info.json, adapter/, job_state.safetensors
    stage-t/trained/                       all jobs + after_stage done: adapters/<name>/ (PEFT format),
                                           state.safetensors (the strategy's state), trained.json
    stage-t/predictions.npz                evaluation done
    stage-t/predictions-stage-j.npz        matrix entry R[t][j] done (`eval.stages: seen | all`)
    stage-t/record.json                    the stage is finished

A finished job and a trained stage are each one folder that lands in one rename, so a kill leaves either
all of it or none of it, and nothing is ever written twice.

Nothing is pickled: adapters and strategy state are safetensors (the state's structure as JSON inside), the
rest JSON and npz. A damaged file of a run folder stops the run with an error naming it and the stage to
delete; a damaged shared result or checkpoint is set aside and recomputed, with a warning.

Shareable jobs and their predictions are stored once for every run of the output folder
(`continual/shared.py`); a shared job is trained under a lock, so a second process that needs it waits and
then reuses it.

Past ~400 lines on purpose: the write order above is the loop's crash-safety argument, and it is checked
most easily when every write is in this one file.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evolora import cost, parallel
from evolora.continual import option_changes
from evolora.continual.base import MAIN, StageContext, Strategy, TrainJob
from evolora.continual.shared import SharedStore
from evolora.data.samples import (
    USER_KINDS,
    StagePools,
    eval_stage_of,
    evaluation_rows,
    matrix_stages,
    train_stages,
)
from evolora.errors import ConfigError, DamagedFileError
from evolora.eval.forgetting import matrix_summary
from evolora.io import (
    atomic_directory,
    atomic_write_json,
    load_npz,
    load_state,
    read_json,
    remove_killed_copies,
    save_npz,
    save_state,
    set_aside,
)
from evolora.locks import exclusive
from evolora.models.precision import machine
from evolora.train.trainer import TrainResult, train_adapter
from evolora.workers import worker_label

log = logging.getLogger("evolora.continual")


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
        self.run_id = "/".join(run_dir.parts[-3:])  # experiment/label/seedN: who trained a shared job
        self._stage = 0  # the stage being run
        self.shared = shared
        self.header = header
        # Which shared job produced each adapter's current weights (None: not reproducible elsewhere).
        self.adapter_keys: dict[str, str | None] = {}
        # Shared jobs whose cost this sitting has counted (trained, or carried from an earlier sitting): a
        # second job of the run with the same key (LSAT's long and default at stage 1) reused it.
        self._counted_jobs: set[str] = set()
        self._after_stage_cost: dict[str, Any] = {}  # of the stage `restore_state` read
        # The set-ups of earlier sittings that finished stages of the run (`run` reads them): its cost too.
        self._earlier_setups: dict[str, Any] = {}
        # Seconds earlier sittings spent on the predictions a stage reads back (its `eval_seconds` has them)
        self._earlier_evaluation = 0.0
        strategy.prediction_store = self.stored_predictions

    # ------------------------------------------------------------------ paths
    def stage_dir(self, t: int) -> Path:
        return self.run_dir / f"stage-{t}"

    def _eval_rows(self, t: int) -> tuple[np.ndarray, int]:
        e = eval_stage_of(t, self.cfg.protocol)
        return self._test_rows(e), len(self.pools[e].test)

    def _test_rows(self, stage: int) -> np.ndarray:
        return evaluation_rows(self.pools, stage, self.cfg.eval.max_samples, self.cfg.eval.seed)

    @contextlib.contextmanager
    def _stage_files(self, t: int, deployed: bool = False) -> Iterator[None]:
        """Files of stage t that cannot be read back stop the run with what to do about them (`deployed`:
        they are a version an update trained, which no rerun of the experiment makes again)."""
        try:
            yield
        except DamagedFileError as e:
            if deployed:
                advice = (
                    "It is a version an update trained, which cannot be made again: promote another version "
                    "(`evolora versions` lists them, `evolora rollback RUN N` promotes one)."
                )
            else:
                advice = (
                    f"Delete {self.stage_dir(t)} and rerun its experiment (`evolora run`): stage {t} is "
                    "redone, earlier stages are kept."
                )
            raise DamagedFileError(e.path, f"{e} {advice}") from None

    # ------------------------------------------------------------------ the run's identity
    def check_run(self) -> None:
        """Refuse to continue a run folder made with other strategy options (the label is the same, so the
        experiment's settings cannot tell); record the options of a new run."""
        options = self.header.get("options", {})
        changes = option_changes(self.run_dir, self.header.get("strategy"), options)
        if changes is not None:
            raise ConfigError(changes.message())
        marker = self.run_dir / "run.json"
        if not marker.is_file():
            atomic_write_json(marker, {"strategy": self.header.get("strategy"), "options": options})

    # ------------------------------------------------------------------ saving and restoring the chain
    def _save_trained(self, t: int, jobs: list[dict[str, Any]], after_stage_cost: dict[str, Any]) -> None:
        """The stage's adapters, strategy state, job records and what `after_stage` cost, as one folder."""
        with atomic_directory(self.stage_dir(t) / "trained") as out:
            for name in self.s.adapters_to_save():
                self.lm.save_adapter(out / "adapters" / name, name)
            save_state(
                out / "state.safetensors", {"strategy": self.s.state(), "adapter_keys": self.adapter_keys}
            )
            record = {"jobs": jobs, "stage_info": self.s.stage_info(), "after_stage_cost": after_stage_cost}
            # what loading it reads, which `Versions.rollback` checks are there
            record["adapters"] = list(self.s.adapters_to_save())
            # when, for a deployed run's version 0: a copy (`cp -r`) gives the file the copy's mtime
            record["trained_at"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            atomic_write_json(out / "trained.json", record)

    def restore_state(
        self, t: int, stage_dir: Path | None = None, deployed: bool = False
    ) -> list[dict[str, Any]]:
        """Load what stage t trained (adapters, strategy state) from this run's stage folder, or from
        `stage_dir` (another run's: a deployed model's version, `deployed` where an update trained it);
        its jobs' records."""
        unit = trained_folder(stage_dir or self.stage_dir(t))
        with self._stage_files(t, deployed):
            for name in self.s.adapters_to_save():
                self.lm.load_adapter(unit / "adapters" / name, name)
            state = _read_stage_state(unit)
            trained = read_json(unit / "trained.json")
        self.s.load_state(state["strategy"])
        self.adapter_keys = dict(state["adapter_keys"])
        self._after_stage_cost = trained.get("after_stage_cost") or {}  # none in records before 2026-12-05
        return trained["jobs"]

    # ------------------------------------------------------------------ one job
    def _run_job(self, ctx: StageContext, job: TrainJob) -> dict[str, Any]:
        d = self.stage_dir(ctx.stage)
        if self._job_done(d, job):
            with self._stage_files(ctx.stage):
                info = self._load_job_result(d, job)
            self._count_earlier_job(info)
            if parallel.writes():
                (d / "checkpoints" / f"{job.name}.safetensors").unlink(missing_ok=True)
            if not job.model:
                self.adapter_keys[job.adapter] = info.get("shared_key")
            self.s.after_job(ctx, job, info)
            return info
        if not (job.shareable and self.shared is not None):
            result = self._train(ctx, job)
            info = self._job_info(job, result.to_dict(), shared_key=None, reused=False)
            self._finish_job(ctx, job, info, None)
            return info

        shared = self.shared
        train = self.cfg.train
        key = shared.job_key(job, self.seed, ctx.stage, train)
        # Another process (another experiment, another strategy) may be training this very job: wait for it.
        with _waited_for(shared.job_lock(key), f"shared training job {key[:8]}"):
            stored = shared.reuse_job(self.lm, key, job.adapter)
            if stored is None and (
                legacy := shared.reuse_legacy_job(self.lm, job, self.seed, ctx.stage, train, self.run_id)
            ):
                key, stored = legacy  # stored under an older evolora's key, for this experiment
            if (
                stored is not None
                and stored.get("trained_for") == self.run_id
                and key not in self._counted_jobs
            ):
                # This run trained it in a sitting that ended before the job was recorded: no reuse.
                cost.carry(stored.get("cost") or {})
                info = self._job_info(job, stored, shared_key=key, reused=False)
                log.info("stage %d, %s: trained in an earlier sitting (%s)", ctx.stage, job.name, key[:8])
            elif stored is not None:
                cost.saved(float(stored.get("train_seconds", 0.0)), cost.cpu_of(stored.get("cost") or {}))
                info = self._job_info(job, stored, shared_key=key, reused=True)
                log.info("stage %d, %s: reused a shared training result (%s)", ctx.stage, job.name, key[:8])
            else:
                shared.remove_stale_temporaries(key)  # of this job, killed while being written
                trainer = {"trained_by": worker_label(), "trained_for": self.run_id}
                record = {**self._train(ctx, job).to_dict(), **trainer}
                with atomic_directory(shared.job_dir(key)) as out:
                    self.lm.save_adapter(out / "adapter", job.adapter)
                    atomic_write_json(out / "result.json", record)
                info = self._job_info(job, record, shared_key=key, reused=False)
        self._counted_jobs.add(key)
        self._finish_job(ctx, job, info, key)
        return info

    def _count_earlier_job(self, info: dict[str, Any]) -> None:
        """A job finished in an earlier sitting whose stage went unrecorded: its cost is this stage's (once
        per shared job: records from before 2026-12-05 have LSAT's second stage-1 job as trained too)."""
        key = info.get("shared_key")
        if info.get("reused_shared_result") or key in self._counted_jobs:
            cost.saved(float(info.get("train_seconds", 0.0)), cost.cpu_of(info.get("cost") or {}))
        else:
            cost.carry(info.get("cost") or {})
        if key is not None:
            self._counted_jobs.add(key)

    def _train(self, ctx: StageContext, job: TrainJob) -> TrainResult:
        d = self.stage_dir(ctx.stage)
        backbone = job.backbone or self.lm
        legacy = d / "checkpoints" / f"{job.name}.pt"
        if legacy.is_file():  # a pickle from an older evolora: never unpickled
            log.warning("%s: a checkpoint in an older format (pickle) is not read; the job restarts", legacy)
            set_aside(legacy)
        if job.init == "fresh":
            backbone.reset_adapter(job.adapter, seed=self.seed * 1000 + ctx.stage, tokens=job.reset_tokens)
        backbone.activate(job.adapter, trainable=True)
        # InfLoRA's statistics for the new A: part of the job, so a rerun that keeps the job counts them
        _, before = cost.measured(lambda: self.s.before_job(ctx, job))
        torch.manual_seed(self.seed * 1000 + ctx.stage)  # dropout masks
        result = train_adapter(
            backbone,
            job.task or self.task,
            self.s.parameters(job),
            job.train_rows,
            job.valid_rows,
            job.train or self.cfg.train.for_job(job.init),
            seed=self.seed * 1000 + ctx.stage,
            extra_loss=(lambda: self.s.extra_loss(job)) if self.s.regularized(ctx.stage) else None,
            checkpoint=d / "checkpoints" / f"{job.name}.safetensors",
            eval_batch_size=job.eval_batch_size or self.cfg.eval.batch_size,
            desc=f"stage {ctx.stage} {job.name}",
        )
        backbone.activate(job.adapter, trainable=False)
        result.cost = cost.added(before, result.cost)
        return result

    def _finish_job(self, ctx: StageContext, job: TrainJob, info: dict, key: str | None) -> None:
        """Store the job's result (record, adapter and strategy state) as one folder: the job is done."""
        d = self.stage_dir(ctx.stage)
        if not job.model:
            self.adapter_keys[job.adapter] = key
        self.s.after_job(ctx, job, info)
        with atomic_directory(d / "jobs" / job.name) as out:
            (job.backbone or self.lm).save_adapter(out / "adapter", job.adapter)
            save_state(out / "job_state.safetensors", self.s.job_state(job))
            atomic_write_json(out / "info.json", info)
        if parallel.writes():
            (d / "checkpoints" / f"{job.name}.safetensors").unlink(missing_ok=True)

    @staticmethod
    def _job_done(d: Path, job: TrainJob) -> bool:
        # jobs/<job>.json: how an older evolora marked a finished job (its adapter in job-adapters/<job>)
        return (d / "jobs" / job.name / "info.json").is_file() or (d / "jobs" / f"{job.name}.json").is_file()

    def _load_job_result(self, d: Path, job: TrainJob) -> dict[str, Any]:
        backbone = job.backbone or self.lm
        folder = d / "jobs" / job.name
        if not (folder / "info.json").is_file():
            backbone.load_adapter(d / "job-adapters" / job.name, job.adapter)
            return read_json(d / "jobs" / f"{job.name}.json")
        backbone.load_adapter(folder / "adapter", job.adapter)
        self.s.load_job_state(job, load_state(folder / "job_state.safetensors"))
        return read_json(folder / "info.json")

    @staticmethod
    def _job_info(job: TrainJob, result: dict, shared_key: str | None, reused: bool) -> dict[str, Any]:
        return {
            "job": job.name,
            "model": job.model or None,
            "adapter": job.adapter,
            "init": job.init,
            "n_train": len(job.train_rows),
            "n_valid": len(job.valid_rows),
            "epochs_run": result["epochs_run"],
            "best_epoch": result["best_epoch"],
            "best_valid": result["best_value"],
            "train_seconds": result["train_seconds"],
            "history": result["history"],
            "cost": result.get("cost", {}),  # what training it took, whoever trained it
            "shared_key": shared_key,
            "reused_shared_result": reused,
            # the process that trained it (`worker i/N` under `evolora run --jobs N`); older records lack it
            "trained_by": result.get("trained_by", None if reused else worker_label()),
        }

    # ------------------------------------------------------------------ one stage
    def _matrix(self, ctx: StageContext, preds: Any) -> tuple[dict[str, Any], int]:
        """Row t of the stage-by-stage matrix: the model after stage t on the test rows of each stage of
        `eval.stages` (the protocol's own stage is the ordinary evaluation). Predictions of a model that an
        earlier stage or another run already scored on those rows come from the shared store. Returns the
        entries' metrics by stage and how many were reused."""
        n_stages = self.task.table.n_stages
        entries: dict[str, Any] = {}
        reused = 0
        for j in matrix_stages(ctx.stage, self.cfg.protocol, n_stages, self.cfg.eval.stages):
            if j == ctx.eval_stage:
                entries[str(j)] = self.task.metrics(preds, ctx.eval_rows)
                continue
            rows = self._test_rows(j)
            entry = StageContext(ctx.stage, j, ctx.pools, ctx.seed, ctx.stage_dir, rows)
            f = ctx.stage_dir / f"predictions-stage-{j}.npz"
            entry_preds, from_store = self._scored(f, entry)
            reused += from_store
            entries[str(j)] = self.task.metrics(entry_preds, rows)
        return entries, reused

    def _scored(self, f: Path, ctx: StageContext) -> tuple[Any, bool]:
        """The predictions on `ctx.eval_rows` that an earlier sitting wrote to `f` (what they cost joins this
        stage's), or computed now and written there with what they cost; True when they came from the shared
        store. Whether they did, and the seconds that saved, are kept in `f` too: a stage record written in a
        later sitting (the run was killed in between) says what an uninterrupted run says."""
        if f.is_file():
            with self._stage_files(ctx.stage):
                arrays = load_npz(f)
            earlier = cost.from_arrays(arrays)
            self._earlier_evaluation += sum(p["seconds"] for p in earlier.values())
            cost.carry(earlier)
            cost.saved(float(arrays.get("saved_seconds", 0.0)), float(arrays.get("saved_cpu_seconds", 0.0)))
            return self.task.load_predictions(arrays), bool(arrays.get("from_store", False))
        before = cost.saved_total()
        (preds, from_store), spent = cost.measured(lambda: self._predict(ctx), "evaluation")
        rows = ctx.eval_rows
        arrays = {**self.task.save_predictions(preds), "rows": rows, "truth": self.task.truth(rows)}
        wall, cpu = (now - then for now, then in zip(cost.saved_total(), before, strict=True))
        reuse = {
            "from_store": np.array(from_store),
            "saved_seconds": np.array(wall),
            "saved_cpu_seconds": np.array(cpu),
        }
        save_npz(f, {**arrays, **cost.to_arrays(spent), **reuse})
        return preds, from_store

    def _predict(self, ctx: StageContext) -> tuple[np.ndarray, bool]:
        if not self.s.plain_predict:  # the strategy reuses its adapters' stored scores itself
            return self.s.predict(ctx, ctx.eval_rows), False
        return self.stored_predictions(MAIN, ctx.eval_rows, lambda: self.s.predict(ctx, ctx.eval_rows))

    def stored_predictions(
        self, adapter: str, rows: np.ndarray, compute: Callable[[], Any]
    ) -> tuple[Any, bool]:
        """`compute()`, the predictions of `adapter` alone on `rows`; when the adapter holds a shared training
        result that any run of the output folder scored on these rows before, the stored predictions
        instead (True: they were reused). Strategies reach this through `Strategy.adapter_predictions`."""
        key = self.adapter_keys.get(adapter)
        if key is None or self.shared is None:
            return compute(), False
        cache = self.shared.predictions_file(key, rows)
        # Runs that reach the same shared adapter at once score it once: the others wait and reuse.
        with _waited_for(cache.with_name(f".{cache.stem}.lock"), f"shared predictions {cache.stem[:8]}"):
            stored = self.shared.load_predictions(cache)
            here = f"{self.run_id}@stage-{self._stage}"  # this run's stage: a later stage's reuse is real
            if stored is not None and str(stored.get("computed_for", "")) == here:
                cost.carry(cost.from_arrays(stored))  # computed by this run in an earlier sitting: no reuse
                return self.task.load_predictions(stored), False
            if stored is not None:
                cost.saved(float(stored.get("seconds", 0.0)), cost.cpu_of(cost.from_arrays(stored)))
                return self.task.load_predictions(stored), True
            # a killed sitting's half-written copy (the age rule for `_shared` would keep it a minute); the
            # lock is the main process's: another process of a launch leaves the files to it
            if parallel.writes():
                remove_killed_copies(cache)
            t0 = time.perf_counter()
            preds, spent = cost.measured(compute)
            seconds = np.array(time.perf_counter() - t0)  # what a later reuse saves
            who = {"computed_for": np.array(here), **cost.to_arrays(spent)}
            save_npz(cache, {**self.task.save_predictions(preds), "seconds": seconds, **who})
            return preds, False

    def train_stage(self, ctx: StageContext) -> list[dict[str, Any]]:
        """Train stage `ctx.stage` (or restore it, when it was trained before); its jobs' records."""
        t = ctx.stage
        self.task.before_stage(self.lm, t)
        if is_trained(ctx.stage_dir):
            jobs_info = self.restore_state(t)
            for info in jobs_info:
                self._count_earlier_job(info)
            cost.carry(self._after_stage_cost)  # LSAT's search, InfLoRA's statistics: kept, so counted
            return jobs_info
        jobs_info = [self._run_job(ctx, job) for job in self.s.plan(ctx)]
        _, after = cost.measured(lambda: self.s.after_stage(ctx))
        self._save_trained(t, jobs_info, after)
        return jobs_info

    def run_stage(self, t: int) -> dict[str, Any]:
        d = self.stage_dir(t)
        self._stage = t
        eval_rows, n_eval_total = self._eval_rows(t)
        ctx = StageContext(t, eval_stage_of(t, self.cfg.protocol), self.pools, self.seed, d, eval_rows)
        jobs_info = self.train_stage(ctx)
        t0, self._earlier_evaluation = time.perf_counter(), 0.0
        preds, reused_preds = self._scored(d / "predictions.npz", ctx)
        matrix = None
        if self.cfg.eval.stages != "next":
            with cost.part("evaluation"):
                matrix = self._matrix(ctx, preds)
        eval_seconds = time.perf_counter() - t0 + self._earlier_evaluation
        record = self._record(ctx, preds, jobs_info, n_eval_total, eval_seconds, reused_preds)
        if matrix is not None:
            record["matrix"], record["matrix_reused"] = matrix
        # under a launch: the work of every process (each read its share of the rows)
        record["cost"] = cost.of_processes(parallel.gather(cost.stage_cost(cost.take(), since=self._clock)))
        self._clock = cost.clock()
        atomic_write_json(d / "record.json", record)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in record["metrics"].items())
        # `frozen` (and any stage a strategy plans no job for) keeps what earlier stages trained
        trained = f"trained on stage {t}" if jobs_info else f"stage {t} kept the weights (nothing trained)"
        log.info(
            "%s: %s, evaluated on stage %d: %s (%d samples)",
            self.header.get("method", "?"),
            trained,
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
        for kind in USER_KINDS:
            sel = kinds == kind
            if sel.any():
                by_kind[kind] = {"n": int(sel.sum()), **self.task.metrics(preds[sel], rows[sel])}
        with self._stage_files(ctx.stage):
            trained = read_json(trained_folder(ctx.stage_dir) / "trained.json")
        own = [j for j in jobs if not j.get("model")]  # jobs of the run's backbone (not a click model's)
        main = next((j for j in own if j["adapter"] == MAIN), own[0] if own else None)
        return {
            "train_stage": ctx.stage,
            "eval_stage": ctx.eval_stage,
            "n_train": main["n_train"] if main else 0,
            "n_valid": main["n_valid"] if main else 0,
            "n_eval": len(rows),
            "n_eval_total": n_eval_total,
            "eval_subsampled": len(rows) < n_eval_total,
            "trained": bool(jobs),
            "train_seconds": training_seconds(jobs),
            "eval_seconds": eval_seconds,
            "reused_shared_predictions": reused_preds,
            "machine": machine(),  # a resumed run's stages may have run on different machines
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
        recorded = self.run_dir / "results.json"
        self._earlier_setups = _setups_of(recorded) if todo else {}
        cost.take()  # a stage's cost runs from here (its strategy's set-up included) to its record
        self._clock = cost.clock()
        self.check_run()
        self.s.setup()
        if not todo:  # said: "running <method>" alone reads as if it trained again
            log.info("every stage already finished (%s): nothing to run", ", ".join(map(str, done)))
        if todo and todo[0] > 1:
            # The chain continues from the last finished stage's saved adapters and state.
            self.task.before_stage(self.lm, todo[0] - 1)
            self.restore_state(todo[0] - 1)
            log.info("resuming: stages %s already finished", done)
        for t in todo:
            self.run_stage(t)
            results = self.results()
            atomic_write_json(self.run_dir / "results.json", results, strict=True)
            if on_stage is not None:
                on_stage(results)
        results = self.results()
        if not todo and recorded.is_file():
            # A rerun with nothing left: its set-up is not the run's cost. The recorded ones are kept with
            # the process that paid them (a report counts one set-up per process and sitting).
            first = read_json(recorded, "Delete it: it is rebuilt from the stage records.")
            if first.get("setup_cost") is not None:
                for key in ("setup_cost", "worker", "setup_id", "setups"):
                    if key in first:
                        results[key] = first[key]
                    else:
                        results.pop(key, None)
        atomic_write_json(recorded, results, strict=True)
        return results

    def results(self) -> dict[str, Any]:
        stages = train_stages(self.cfg.protocol, self.task.table.n_stages)
        records = []
        for t in stages:
            if (self.stage_dir(t) / "record.json").is_file():
                with self._stage_files(t):
                    records.append(read_json(self.stage_dir(t) / "record.json"))
        summary: dict[str, Any] = {"mean": {}}
        if records:
            for m in self.task.metric_names:
                vals = [r["metrics"][m] for r in records if not np.isnan(r["metrics"].get(m, np.nan))]
                summary["mean"][m] = float(np.mean(vals)) if vals else float("nan")
            summary["train_seconds"] = float(sum(r["train_seconds"] for r in records))
            if self.cfg.eval.stages != "next":
                rows = {r["train_stage"]: r.get("matrix", {}) for r in records}
                summary["matrix"] = matrix_summary(rows, self.cfg.protocol, self.task.metric_names)
            summary["cost"] = cost.add([r["cost"] for r in records if "cost" in r])
        setups = {}
        if "setup_id" in self.header:  # every sitting that did work on the run: its set-up, by sitting
            setups = {**self._earlier_setups, self.header["setup_id"]: self.header["setup_cost"]}
        return {
            **self.header,
            **({"setups": setups} if setups else {}),
            "complete": len(records) == len(stages),
            "stages": records,
            "summary": summary,
        }


def trained_folder(stage_dir: Path) -> Path:
    """Where a stage's trained adapters and state are: `trained/`, or the stage folder itself for a run of
    an older evolora."""
    unit = stage_dir / "trained"
    return unit if unit.is_dir() or not (stage_dir / "trained.json").is_file() else stage_dir


def _setups_of(recorded: Path) -> dict[str, Any]:
    """The set-up cost of each sitting that did work on a run, by sitting, as its results.json (written by
    an earlier sitting, if any) records them (`cost.setups_of`)."""
    if not recorded.is_file():
        return {}
    return cost.setups_of(read_json(recorded, "Delete it: it is rebuilt from the stage records."))


@contextlib.contextmanager
def _waited_for(lock: Path, what: str) -> Iterator[None]:
    """Hold `lock` for the block, waiting while another process holds it; the wait is a cost part of its
    own (`waiting`: time spent neither computing nor saved)."""
    with contextlib.ExitStack() as held:
        with cost.part("waiting"):
            held.enter_context(exclusive(lock, what, wait=True))
        yield


def is_trained(stage_dir: Path) -> bool:
    return (trained_folder(stage_dir) / "trained.json").is_file()


def training_seconds(jobs: list[dict[str, Any]]) -> float:
    """What producing a stage's model took: its jobs' training seconds, whoever trained them, a job that
    several of its adapters share (LSAT's two at its first stage: one key) counted once."""
    by_job = {job.get("shared_key") or i: float(job["train_seconds"]) for i, job in enumerate(jobs)}
    return float(sum(by_job.values()))


def stage_state_file(unit: Path) -> Path:
    """Where a stage's strategy state is: `state.safetensors`, or the `state.pt` of an older evolora."""
    current, legacy = unit / "state.safetensors", unit / "state.pt"
    return legacy if legacy.is_file() and not current.is_file() else current


def _read_stage_state(unit: Path) -> dict[str, Any]:
    """A stage's strategy state (`stage_state_file`); an older evolora's `state.pt` is read with
    `weights_only=True` (tensors and plain values only: a pickle that would run code is refused)."""
    path = stage_state_file(unit)
    if path.suffix != ".pt":
        if not path.is_file():
            raise DamagedFileError(path, f"{path} is missing (the stage's strategy state).")
        return load_state(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the safe unpickler refuses anything but tensors and plain values
        raise DamagedFileError(
            path, f"{path} cannot be read safely (an older pickle format; refused: {type(e).__name__})."
        ) from None
