"""The Python API: run an experiment, load a trained run, ask it for scores and recommendations.

    import evolora
    results = evolora.run("configs/quickstart.yaml", **{"train.epochs": 1})
    rec = evolora.Recommender.load("runs/quickstart", method="finetune")
    rec.score(user="196", items=["242", "302"])            # CTR runs: P(like) per item
    rec.recommend(history=["242", "302"], k=10)            # next-item runs: top k items
    rec.recommend(user="196", items=["1", "2", "3"], k=2)  # CTR runs: the best of given candidates
    evolora.report("runs/quickstart").data                 # the comparison's numbers (report.json)

`Recommender.load` rebuilds exactly the model that produced a stage's results, for every strategy, from the
run folder and the inference bundle saved with the experiment (`bundle.py`): the training data is not read
again. A history is a list of item ids (each counted as liked), of (item, rating) pairs, or a mapping item ->
rating; or give `user=` and the user's history at the end of the stage is used.

In a notebook or a service: `run` leaves the process's torch threads and random state as they were, and one
experiment or update runs at a time per process (a second from another thread is refused); a `Recommender`
may be asked from several threads, which take turns.

(About 670 lines: `Recommender`'s loading, its single and batched queries and their shared checks read
best together; how a query is checked lives in `queries.py`, how overrides are read in `overrides.py`.)
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from pydantic import ValidationError

from evolora.bundle import (
    QUERY_DEFAULTS,
    bundle_dir,
    bundle_is_current,
    bundled_rating_range,
    check_template,
    load_bundle,
    query_frame,
    run_config,
    write_bundle,
)
from evolora.config import (
    QUICKSTART,
    RunConfig,
    StrategySpec,
    config_from_dict,
    load_config,
    nearest_key,
    shipped_config,
)
from evolora.continual import Env, Strategy, build_strategy, recorded_options
from evolora.continual.base import StageContext
from evolora.continual.loop import StageLoop
from evolora.data.digest import data_digest
from evolora.data.ids import accents_apart, known_form, known_forms
from evolora.data.prepare import Prepared, prepare_data
from evolora.data.samples import SampleTable, eval_stage_of
from evolora.deploy.versions import Version, Versions
from evolora.errors import ConfigError, EvoloraError, UnknownIdError
from evolora.eval.report import Report, compose_report
from evolora.experiment import (
    answering_backbone,
    build_model_and_task,
    own_caches,
    resolve_config,
    run_experiment,
    where_its_config_lies,
    with_model_at,
)
from evolora.io import read_json
from evolora.models.conventional import is_conventional
from evolora.models.precision import fp16_unavailable
from evolora.overrides import as_overrides, plain
from evolora.progress import task as progress_task
from evolora.queries import (
    History,
    Ranked,
    Scored,
    batch_of,
    checked_samples,
    count_of,
    flag_of,
    history_pairs,
    item_list,
    list_of,
    locate_run,
    number_of,
    query_of,
    read_results,
    trained_stage,
)
from evolora.tasks import task_spec

log = logging.getLogger("evolora")
#: The widest beam search a next-item LLM run's recommendation takes, as queries x beams x vocabulary in one
#: pass: every step holds about four such tables of float32 scores, 4 GB at this bound (SmolLM2's 49k tokens:
#: one query of up to 5,086 beams; a whole 39k-item catalogue, unbounded, would hold about 31 GB). Queries
#: of one width are searched together as far as the bound allows.
MAX_BEAM_SCORES = 250_000_000


def run(
    config: str | Path | RunConfig | Mapping[str, Any] | None = None,
    jobs: int = 1,
    overwrite: bool = False,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Run an experiment (a YAML path, the name of a config evolora ships such as "forgetting-ctr-ml100k", a
    `RunConfig`, a mapping of sections as the YAML holds them, or None for the quickstart) and return each
    (strategy, seed)'s results. Overrides are keys as `--set` takes them: `run(path, **{"train.epochs": 3})`,
    or sections as mappings: `run(path, train={"epochs": 3})`.
    `jobs`: worker processes for the (strategy, seed) pairs (`evolora run --jobs`); `overwrite`: replace an
    experiment of other settings in the same folder (`evolora run --overwrite`)."""
    if not isinstance(jobs, int | np.integer) or isinstance(jobs, bool) or jobs < 1:
        raise ConfigError(f"run(jobs={jobs!r}): give 1 or more worker processes")
    sets = as_overrides(overrides)
    if isinstance(config, RunConfig):
        cfg = config_from_dict(config.model_dump(mode="json"), sets, "run(config)", flag="")
    elif isinstance(config, Mapping):
        cfg = config_from_dict(plain(config), sets, "run(config)", flag="")
    elif config is None or isinstance(config, str | Path):
        shipped = None if config is None else shipped_config(config)
        if shipped is not None:
            log.info("running evolora's shipped config %s (%s)", config, shipped)
        path = QUICKSTART if config is None else shipped or config
        cfg = load_config(path, sets, flag="")
        cfg = where_its_config_lies(path, cfg, sets)
    else:
        raise ConfigError(
            f"run(config): a YAML path, a RunConfig or a mapping of sections, not {type(config).__name__}"
        )
    if not isinstance(overwrite, bool):  # overwrite="false" must not delete an experiment
        raise ConfigError(f"run(overwrite={overwrite!r}): True or False")
    return run_experiment(cfg, overwrite=overwrite, jobs=int(jobs))


def report(
    paths: str | Path | Iterable[str | Path],
    metrics: str | Iterable[str] | None = None,
    baseline: str | None = None,
) -> Report:
    """Compare finished runs as `evolora report` does, without writing files: `.text` is report.md, `.data`
    report.json (per metric, method and stage each seed's value, the bootstrap differences to `baseline`).
    `paths`: experiment or run folders; `metrics`: a metric or a list of them (default: the tasks')."""
    folders = list_of(paths, str | Path, "report(paths): a folder or a list of folders")
    if not folders:
        raise EvoloraError("report(paths): give at least one experiment or run folder")
    names = None if metrics is None else list_of(metrics, str, "report(metrics=...): a metric or a list")
    if names == []:
        raise EvoloraError("report(metrics=[]): name at least one metric, or leave metrics out")
    if baseline is not None and not isinstance(baseline, str):
        raise EvoloraError(f"report(baseline=...): a method's label, not {baseline!r}")
    return compose_report([Path(p) for p in folders], names, baseline, options=("metrics=", "baseline="))


def _answerable_here(cfg: RunConfig) -> RunConfig:
    """A run trained in fp16 (a CUDA GPU without bf16) answers in fp32 on a machine without a CUDA GPU,
    where fp16 cannot run: its adapters are fp32 either way; its answers differ from the run's in the last
    digits, and a warning says so."""
    if cfg.model.precision != "fp16" or fp16_unavailable(cfg.model.device) is None:
        return cfg
    log.warning(
        "this run trained in fp16 on a CUDA GPU; without one here it answers in fp32 (its figures may differ "
        "from the run's in the last digits)"
    )
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"precision": "fp32"})})


class Recommender:
    """A trained run's model after one stage, answering for any user or history."""

    def __init__(
        self,
        strategy: Strategy,
        cfg: RunConfig,
        prepared: Prepared,
        histories: pl.DataFrame,
        stage: int,
        method: str,
        seed_dir: Path,
        version: int = 0,
        precision: str | None = None,
        rating_scale: tuple[float, float] | None = None,
    ) -> None:
        self.strategy = strategy
        self._one_query = threading.Lock()
        self.precision = precision  # the one the run trained in, as it recorded it
        self.cfg = cfg
        self.prepared = prepared
        self.stage = stage
        # Past the data's last stage (a deployed version's newest), queries are asked as of that stage.
        self.eval_stage = min(eval_stage_of(stage, cfg.protocol), prepared.table.n_stages)
        self.version = version  # of a deployed run (0: as `evolora run` left it)
        self.method = method
        self.seed = strategy.seed
        self.seed_dir = seed_dir
        self.task_name = cfg.task.name
        answers = task_spec(cfg.task.name)
        #: True: this run scores the items it is given (CTR); False: it generates its own top k (next-item)
        self.scores_given = answers.scores_given
        self.score_name, self.score_column = answers.score_name, answers.score_column
        self._task = strategy.task  # the run's task; queries get copies of it over their own samples
        # Users, their histories and what they rated as of that stage too: a next_stage run's last stage is
        # data it read (and tested on) though no model trained on it.
        at_stage = histories.filter(pl.col("stage") == self.eval_stage)
        self._histories = {
            u: (list(items), list(ratings))
            for u, items, ratings in zip(
                at_stage["user_id"], at_stage["items"], at_stage["ratings"], strict=True
            )
        }
        # Every item a user rated up to the stage (bundles of older evolora runs keep only the history).
        seen = at_stage["seen"] if "seen" in at_stage.columns else at_stage["items"]
        if "seen" not in at_stage.columns:
            # Only the run's own bundle is rebuilt from the data; a version's holds the batches it applied.
            rebuild = (
                "its data could not be read to rebuild it"
                if version == 0
                else "an older evolora's update wrote it; the versions of later updates have them"
            )
            log.warning(
                "this run's inference bundle predates seen items: only the latest %d items of a user are "
                "left out of recommendations (%s)",
                prepared.table.history_len,
                rebuild,
            )
        self._seen = dict(zip(at_stage["user_id"], seen, strict=True))
        items = prepared.data.items
        self._titles = dict(zip(items["item_id"].to_list(), items["title"].to_list(), strict=True))
        self.like_threshold = prepared.data.like_threshold
        # the lowest and highest rating of the run's data: a query's ratings are checked against them
        self.rating_scale = rating_scale

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        run_dir: str | Path,
        method: str | None = None,
        seed: int | None = None,
        stage: int | None = None,
        version: int | None = None,
        model: str | Path | None = None,
    ) -> Recommender:
        """The model of `method` (seed `seed`) as it stood after training `stage`, or a deployed run's
        `version` (see `evolora update`). Default: the promoted version of a deployed run, else the run's
        last stage.

        `run_dir`: an experiment folder (`runs/<name>`) or one run's folder (`runs/<name>/<method>/seed<k>`).
        `model`: where the run's base LLM lies now, if not at its `model.name` (a run folder copied to
        another machine); weights other than those it trained on are loaded with a warning.
        """
        if not isinstance(run_dir, str | Path):
            raise ConfigError(f"run_dir: a run's folder (a path), not {run_dir!r}")
        stage, version = number_of(stage, "stage"), number_of(version, "version")
        seed = number_of(seed, "seed")  # seed="0" refused for an experiment folder as for a run's
        if stage is not None and version is not None:
            raise ConfigError("give a stage or a version, not both (a version names its stage)")
        seed_dir, root = locate_run(Path(run_dir), method, seed)
        results = read_results(seed_dir)
        cfg = with_model_at(resolve_config(run_config(root)), model)
        registry = Versions.of_run(root, results)
        if version is not None or (stage is None and registry.file.is_file()):
            chosen = registry.get(registry.promoted if version is None else version)
            if chosen.id > 0:
                return cls._load_version(cfg, root, results, chosen)
        deployed = [v.id for v in registry.versions if v.stage == stage and v.id > 0]
        t = trained_stage(seed_dir, results, stage, cfg.protocol, deployed)
        marker = root / "experiment.json"
        recorded = read_json(marker) if marker.is_file() else {}
        key, data_sha256 = recorded.get("context_key"), recorded.get("data_files", {}).get("sha256")
        if not bundle_is_current(bundle_dir(root), key, cfg.task.history_kept(), data_sha256):
            # A run of an older evolora, or a bundle of settings its experiment no longer has: read the data
            # once to save what inference needs.
            log.info("%s: saving what inference needs (the data is read once)", root)
            try:
                full = cfg.model_copy(update={"output_dir": str(root.parent)})
                prepared = prepare_data(full)
                now = data_digest(prepared.data)["sha256"]
                if data_sha256 is not None and now != data_sha256:
                    raise EvoloraError(
                        f"{root}: its data files changed since the experiment ran, so what inference needs "
                        "cannot be rebuilt from them; put back the files it ran on"
                    )
                prepared.caches = own_caches(root, full, prepared.data)  # those its stages were trained on
                build_model_and_task(full, prepared)  # fills the caches the bundle copies
                write_bundle(root, full, prepared, key, now)
            except EvoloraError as e:
                if not (bundle_dir(root) / "bundle.json").is_file():
                    raise
                log.warning("%s: its inference bundle is kept as is: the data cannot be used (%s)", root, e)
        return cls._restore(cfg, root, root, results, t, seed_dir / f"stage-{t}", version=0)

    @classmethod
    def _load_version(cls, cfg: RunConfig, root: Path, results: dict[str, Any], v: Version) -> Recommender:
        """A version an update made: its stage folder and the bundle of the data up to it are in its work
        folder."""
        stage_dir = root / v.folder
        return cls._restore(cfg, root, stage_dir.parent, results, v.stage, stage_dir, version=v.id)

    @classmethod
    def _restore(
        cls,
        cfg: RunConfig,
        root: Path,
        bundle_root: Path,
        results: dict[str, Any],
        t: int,
        stage_dir: Path,
        version: int,
    ) -> Recommender:
        which = f"version {version}" if version else f"stage {t}"
        # seconds of reading weights and bundle (about 10 s for SmolLM2): a bar without steps where shown
        with progress_task(f"loading {results['method']} ({which})", None):
            inference_cfg, prepared, histories = load_bundle(bundle_root, cfg)
            inference_cfg = _answerable_here(inference_cfg)
            pretrained = answering_backbone(inference_cfg, root, bundle_root)
            lm, task = build_model_and_task(inference_cfg, prepared, pretrained)
            check_template(root, task)
            # the options it ran with (an option added since takes its value of then: recorded_options)
            spec = StrategySpec(
                name=results["strategy"], label=results["method"], **recorded_options(results)
            )
            strategy = build_strategy(spec, Env(lm, task, inference_cfg, prepared), results["seed"])
            strategy.setup()
            task.before_stage(lm, t)
            loop = StageLoop(strategy, {}, stage_dir.parent, None, {})
            loop.restore_state(t, stage_dir=stage_dir, deployed=version > 0)
        return cls(
            strategy, inference_cfg, prepared, histories, t, results["method"], stage_dir.parent, version,
            results.get("precision"), bundled_rating_range(bundle_root),
        )  # fmt: skip

    # ------------------------------------------------------------------ asking
    @property
    def known_users(self) -> list[str]:
        return sorted(self._histories)

    def history_of(self, user: str) -> tuple[list[str], list[float]]:
        """A known user's latest interactions at the end of the stage (items, ratings), oldest first."""
        return self._histories[self.user_id(user)]

    def seen_by(self, user: str) -> set[str]:
        """Every item a known user rated up to the stage: what recommendations leave out."""
        return set(self._seen[self.user_id(user)])

    def user_id(self, user: Any) -> str:
        """A known user's id as the run holds it (`known_form`: an id given as a number is its string, one
        copied with spaces at its ends the run's); an unknown user is an error."""
        if not isinstance(user, str | int) or isinstance(user, bool):
            raise EvoloraError(f"user: an id (a string), not {user!r}")
        known = known_form(user, self._histories)
        if known not in self._histories:
            raise UnknownIdError(
                f"unknown user {str(user)!r}: the run knows {len(self._histories)} users up to stage "
                f"{self.eval_stage}; give their history instead{accents_apart([known], self._histories)}"
            )
        return known

    def predict_samples(self, samples: pl.DataFrame, **settings: Any) -> Any:
        """The strategy's predictions for sample rows shaped like a run's sample table (`user_id`,
        `item_id`, `hist_items`, `hist_ratings`, `stage`; the table's other columns, e.g. `label`, may be
        left out), exactly as evaluation computes them. A `rated` column (list of item ids) names every item
        a row's user rated: what `exclude_history="rated"` keeps out of a ranking (else its history).

        `settings`: keys of the run's task section for this call only (e.g. `beams=20`,
        `exclude_history="rated"`), checked as the config checks them."""
        task_cfg = self._task.cfg
        for key in settings:
            if key not in type(task_cfg).model_fields:
                near, keys = nearest_key(type(task_cfg), key)
                hint = f"did you mean {near}? " if near else ""
                raise EvoloraError(
                    f"predict_samples: {key} is no setting of the {task_cfg.name} task ({hint}it takes "
                    f"{', '.join(keys)})"
                )
        try:
            checked = type(task_cfg).model_validate({**task_cfg.model_dump(), **settings})
        except ValidationError as e:
            problem = e.errors()[0]
            where = ".".join(str(p) for p in problem["loc"])
            raise EvoloraError(f"predict_samples: {where}={problem['input']!r}: {problem['msg']}") from None
        # the values as the config reads them ("false" is False, "20" is 20), not as given
        return self._predict(samples, {key: getattr(checked, key) for key in settings})

    def _predict(self, samples: pl.DataFrame, settings: dict[str, Any]) -> Any:
        if not isinstance(samples, pl.DataFrame):
            raise EvoloraError(
                f"predict_samples: a polars DataFrame of sample rows, not {type(samples).__name__}"
            )
        needed = ["user_id", "item_id", "hist_items", "hist_ratings", "stage"]
        missing = [c for c in needed if c not in samples.columns]
        if missing:
            raise EvoloraError(f"predict_samples: the samples lack the column(s) {missing}")
        # its shape, its stages, a conventional model's user IDs (the LLM reads no user id)
        samples = checked_samples(samples, self._task.table.n_stages, getattr(self._task, "space", None))
        known = self._task.items
        samples = samples.with_columns(  # ids as the run knows them (`known_form`)
            known_forms(pl.col("item_id"), known),
            pl.col("hist_items").list.eval(known_forms(pl.element(), known)),
        )
        for column, values in (
            ("item_id", samples["item_id"]),
            ("hist_items", samples["hist_items"].explode()),
        ):
            self._check_items(values.drop_nulls().to_list(), column)
        schema = query_frame([]).schema  # the sample table's other columns, where not given: a query's
        samples = samples.with_columns(
            pl.lit(value, schema[c]).alias(c)
            for c, value in QUERY_DEFAULTS.items()
            if c not in samples.columns
        )
        table = SampleTable(
            samples, self._task.table.n_stages, self._task.table.history_len, self.like_threshold
        )
        query = self._task.for_table(table, **settings)
        ctx = StageContext(
            self.stage,
            self.eval_stage,
            {},
            self.strategy.seed,
            self.seed_dir / f"stage-{self.stage}",
            asked="scoring" if self.scores_given else "recommending",
        )
        # The strategy holds one task at a time: queries from several threads take turns (swapped in
        # between, one query's rows were scored against another's table).
        with self._one_query:
            self.strategy.use_task(query)
            return self.strategy.predict(ctx, np.arange(len(table)))

    def score(
        self, history: History = None, items: Iterable[str] = (), user: str | None = None
    ) -> list[Scored]:
        """P(like) of each item for this user or history (CTR runs), in the order given."""
        return self.score_many([(history, item_list(items), user)])[0]

    def score_many(self, queries: list[tuple[History, list[str], str | None]]) -> list[list[Scored]]:
        """`score` for several (history, items, user) queries at once: one pass over all their samples."""
        if not self.scores_given:
            raise EvoloraError(f"score() needs a CTR run; this is a {self.task_name} run: use recommend()")
        resolved = []
        for query in batch_of(queries, "score_many"):
            history, items, user = query_of(query, ("history", "items", "user"), "score_many")
            items = item_list(items)
            if not items:
                raise EvoloraError("score(): give at least one item to score")
            items = self._check_items(items, "items")
            user, hist_items, hist_ratings, _ = self._history(history, user)
            resolved.append((user, hist_items, hist_ratings, items))
        return self._score_resolved(resolved)

    def _score_resolved(
        self, queries: list[tuple[str | None, list[str], list[float], list[str]]]
    ) -> list[list[Scored]]:
        rows: list[dict[str, Any]] = []
        spans = []
        for user, hist_items, hist_ratings, items in queries:
            spans.append((len(rows), items))
            rows += [self._row(user, item, hist_items, hist_ratings) for item in items]
        scores = np.asarray(self._predict(query_frame(rows), {}), dtype=np.float64)
        return [
            [Scored(i, float(p), self._titles.get(i)) for i, p in zip(items, scores[start:], strict=False)]
            for start, items in spans
        ]

    def recommend(
        self,
        history: History = None,
        k: int = 10,
        user: str | None = None,
        exclude_seen: bool = True,
        items: Iterable[str] | None = None,
    ) -> list[Scored]:
        """The top `k` items for this user or history, best first.

        Next-item runs generate them (trie-constrained beam search with at least `k` beams for LLMs, a full
        ranking for conventional models); CTR runs rank the candidate `items` by P(like). `exclude_seen`
        leaves out every item of the history given, or every item `user` rated up to the stage (the model
        reads only the latest `task.history_len` of them); candidates left out so are logged at INFO on the
        `evolora` logger (`rank_many` returns them), and a `UserWarning` says so when none is left.
        """
        k = count_of(k)
        if not self.scores_given:
            if items is not None:
                raise EvoloraError(
                    "recommend(items=...) ranks a CTR run's candidates; a next-item run generates"
                )
            return self.recommend_many([(history, k, user)], exclude_seen)[0]
        if items is None:
            raise EvoloraError("a CTR run ranks given candidates: recommend(..., items=[...])")
        ranked = self.rank_many([(history, item_list(items), k, user)], exclude_seen)[0]
        if ranked.left_out_seen:  # said, not silent: every candidate may be one of them
            said = (
                f"recommend: {len(ranked.left_out_seen)} of the candidates left out as seen "
                f"({', '.join(ranked.left_out_seen[:10])}); exclude_seen=False ranks them too"
            )
            log.info(said)
            if not ranked.items:  # an empty answer a caller without logging set up would not understand
                warnings.warn(said, UserWarning, stacklevel=2)
        return ranked.items

    def rank_many(
        self, queries: list[tuple[History, list[str], int, str | None]], exclude_seen: bool = True
    ) -> list[Ranked]:
        """`recommend` (CTR runs) for several (history, candidate items, k, user) queries in one pass: each
        query's candidates by P(like), best first, duplicates once; with `exclude_seen`, candidates in the
        history (every item `user` rated up to the stage) are left out and named in `left_out_seen`."""
        if not self.scores_given:
            raise EvoloraError("a next-item run generates its recommendations: recommend_many")
        exclude_seen = flag_of(exclude_seen, "exclude_seen")
        resolved, spans = [], []
        for query in batch_of(queries, "rank_many"):
            history, items, k, user = query_of(query, ("history", "items", "k", "user"), "rank_many")
            k, items = count_of(k), item_list(items)
            user, hist_items, hist_ratings, seen = self._history(history, user)
            items = self._check_items(items, "items")
            if not items:
                raise EvoloraError("recommend(): give at least one candidate item to rank")
            seen = seen if exclude_seen else set()
            asked = list(dict.fromkeys(items))
            candidates = [i for i in asked if i not in seen]
            spans.append((len(resolved), k, bool(candidates), [i for i in asked if i in seen]))
            if candidates:
                resolved.append((user, hist_items, hist_ratings, candidates))
        scored = self._score_resolved(resolved) if resolved else []
        return [
            Ranked(sorted(scored[at], key=lambda s: -s.score)[:k] if any_left else [], left_out)
            for at, k, any_left, left_out in spans
        ]

    def check(self, history: History = None, user: str | None = None, items: list[str] | None = None) -> None:
        """Raise `EvoloraError` for what a query of `score`/`recommend` could not answer (an unknown user
        or item, a malformed history), without computing anything."""
        self._history(history, user)
        if items is not None:
            self._check_items(item_list(items), "items")  # ids given as numbers: their strings, as queries

    def recommend_many(
        self, queries: list[tuple[History, int, str | None]], exclude_seen: bool = True
    ) -> list[list[Scored]]:
        """`recommend` (next-item runs) for several (history, k, user) queries in one pass."""
        if self.scores_given:
            raise EvoloraError("a CTR run ranks given candidates: score them")
        exclude_seen = flag_of(exclude_seen, "exclude_seen")
        queries = [
            query_of(q, ("history", "k", "user"), "recommend_many")
            for q in batch_of(queries, "recommend_many")
        ]
        queries = [(history, count_of(k), user) for history, k, user in queries]
        histories = [
            self._history(history, user) for history, _, user in queries
        ]  # (user, items, ratings, seen)
        target = next(iter(self._task.items))  # any known item: generation ignores the target
        # Every seen item is kept out of the search itself (`exclude_history: rated` over the query's
        # `rated` items), not filtered after it: k beams suffice however long the history, and a query's
        # answer is the one evaluation under `exclude_history: rated` would give it. A levelwise search
        # walks levels, not the trie, and excludes nothing: it searches k + |seen| wide and filters after.
        levelwise = not is_conventional(self.cfg.model.name) and self._task.cfg.constraint == "levelwise"
        in_search = exclude_seen and not levelwise
        rows = [
            {**self._row(u, target, h, r), "rated": sorted(seen) if in_search else []}
            for u, h, r, seen in histories
        ]
        n_items = len(self._task.items)
        widths = [
            k + len(seen) * (exclude_seen and levelwise)
            for (_, k, _), (_, _, _, seen) in zip(queries, histories, strict=True)
        ]
        # A query's beams depend on it alone (a wider search can find other items): queries of one width
        # share a pass. No more beams than items: each finished beam is a distinct item.
        vocabulary = None if is_conventional(self.cfg.model.name) else self._vocabulary()  # (LLM: bounded)
        groups: dict[int, list[int]] = {}
        for q, width in enumerate(widths):
            beams = min(max(width, getattr(self._task.cfg, "beams", width)), n_items)
            if vocabulary is not None and beams * vocabulary > MAX_BEAM_SCORES:
                widened = f" and the {width - queries[q][1]} items seen" if width > queries[q][1] else ""
                raise EvoloraError(
                    f"k={queries[q][1]}: an LLM run searches as many beams as items asked{widened}, here "
                    f"{beams}; this model's {vocabulary} tokens allow {MAX_BEAM_SCORES // vocabulary} (each "
                    "step holds beams x vocabulary scores)"
                )
            groups.setdefault(beams, []).append(q)
        out: list[list[Scored]] = [[] for _ in queries]
        for beams, group in sorted(groups.items()):
            # A pass holds every query's beams at once: as many queries as keep within the bound.
            per_pass = len(group) if vocabulary is None else max(1, MAX_BEAM_SCORES // (beams * vocabulary))
            for start in range(0, len(group), per_pass):
                part = group[start : start + per_pass]
                frame = query_frame([rows[q] for q in part])
                settings = {"beams": beams, "exclude_history": "rated" if in_search else False}
                ranked = self._predict(frame, settings)
                for at, q in enumerate(part):
                    seen = histories[q][3] if exclude_seen else set()
                    out[q] = [s for s in self._top(ranked, at) if s.item not in seen][: queries[q][1]]
        return out

    def _vocabulary(self) -> int:
        """The rows of the LLM's output layer: the width of every beam's scores."""
        return int(self.strategy.lm.base.get_output_embeddings().weight.shape[0])

    def _top(self, ranked: Any, row: int) -> list[Scored]:
        ids = self._task.item_ids
        return [
            Scored(ids[int(i)], float(s), self._titles.get(ids[int(i)]))
            for i, s in zip(ranked.items[row], ranked.scores[row], strict=True)
            if i >= 0 and np.isfinite(s)
        ]

    @property
    def known_items(self) -> frozenset[str]:
        return self._task.items

    @property
    def known_users_set(self) -> Any:
        return self._histories.keys()

    # ------------------------------------------------------------------ helpers
    def _row(self, user: str | None, item: str, hist_items: list[str], hist_ratings: list[float]) -> dict:
        return {
            "user_id": user or "",
            "item_id": item,
            "stage": self.eval_stage,
            "hist_items": hist_items,
            "hist_ratings": hist_ratings,
        }

    def _history(
        self, history: History, user: str | None
    ) -> tuple[str | None, list[str], list[float], set[str]]:
        """(the user as the run holds it, None for a history; the history the model reads: the latest
        `task.history_len` items, their ratings; every item of the history or that the user rated: what
        recommendations leave out)."""
        if (user is None) == (history is None):
            raise EvoloraError("give a user or a history (one of them; an empty history is [])")
        if user is not None:
            known = self.user_id(str(user))
            return known, *self._histories[known], set(self._seen[known])
        # an item given without a rating counts as liked
        pairs = history_pairs(
            history, self.like_threshold + 1.0, self.rating_scale, self.cfg.data.label_column
        )
        ids = self._check_items([i for i, _ in pairs], "history")
        pairs = [(i, r) for i, (_, r) in zip(ids, pairs, strict=True)]
        seen = {i for i, _ in pairs}
        pairs = pairs[-self._task.table.history_len :]
        return None, [i for i, _ in pairs], [r for _, r in pairs], seen

    def _check_items(self, items: list[str], what: str) -> list[str]:
        """`items` as the run knows them (`known_form`); an unknown one is an error naming it."""
        if isinstance(items, str | bytes):
            raise EvoloraError(f"{what}: a list of item ids, not the string {items!r}")
        known = self._task.items  # (a set built on each access)
        as_known = [known_form(i, known) for i in items]
        unknown = [i for i, k in zip(items, as_known, strict=True) if k not in known]
        if unknown:
            apart = accents_apart([k for k in as_known if k not in known], known)
            raise UnknownIdError(
                f"{what}: {len(unknown)} unknown item(s) {unknown[:5]}: the run knows {len(known)} items (an "
                f"item first seen after training cannot be read){apart}"
            )
        return as_known
