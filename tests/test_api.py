"""The Python API: a loaded run reproduces its own evaluation, and answers for users and histories."""

from __future__ import annotations

import itertools
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

import evolora
from evolora.deploy.update import update_run
from evolora.errors import ConfigError, EvoloraError, UnknownIdError
from evolora.experiment import prepare_data, restore_run, run_dir_of, run_experiment
from evolora.io import load_npz
from evolora.queries import locate_run
from tests.helpers import EXAMPLE_TABLE, LORA_STRATEGIES, tiny_config, write_peso_cycle

CRM = {"dim": 8, "mlp": [16], "max_len": 10, "dropout": 0.0}
CTR_STRATEGIES = [*LORA_STRATEGIES, {"name": "reclora", "n_meta": 3, "crm": CRM, "crm_epochs": 1}]
SMALL = {"train.epochs": 1, "train.samples_per_stage": 24, "train.valid_samples": 16, "eval.max_samples": 24}


def flow(value: object) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().replace("\n", " ")


def samples_of(cfg, stage: int, rows: np.ndarray):
    """The evaluated sample rows of a stage, as the test's own copy of the data has them."""
    table = prepare_data(cfg).table
    return table.df[rows]


@pytest.fixture(scope="module")
def ctr_run(sunny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("api")
    over = {
        **SMALL,
        "task.history_len": 4,
        "task.retrieve_from": 8,
        "task.sample_history": 10,
        "strategies": flow(CTR_STRATEGIES),
    }
    cfg = tiny_config(sunny_dir, out, **over)
    return cfg, run_experiment(cfg)


@pytest.mark.parametrize("method", [s.get("label", s["name"]) for s in CTR_STRATEGIES])
def test_a_loaded_run_reproduces_its_stored_predictions(ctr_run, method: str) -> None:
    cfg, _ = ctr_run
    root = Path(cfg.output_dir) / cfg.name
    for stage in (1, 2):
        rec = evolora.Recommender.load(root, method=method, stage=stage)
        stored = load_npz(run_dir_of(cfg, method, 0) / f"stage-{stage}" / "predictions.npz")
        got = rec.predict_samples(samples_of(cfg, stage, stored["rows"]))
        # The same prompts in the same batches: the same numbers (RecLoRA's router runs its batch anew).
        np.testing.assert_allclose(got, stored["scores"], rtol=0, atol=1e-6 if method == "reclora" else 0)
        rec.strategy.teardown()


def test_score_and_recommend_for_users_and_histories(ctr_run) -> None:
    cfg, _ = ctr_run
    rec = evolora.Recommender.load(Path(cfg.output_dir) / cfg.name, method="finetune")
    user = rec.known_users[0]
    items, ratings = rec.history_of(user)
    assert len(items) <= 10
    scored = rec.score(user=user, items=["2", "3"])
    assert [s.item for s in scored] == ["2", "3"] and all(0 < s.score < 1 for s in scored)
    assert scored[0].title == "Sunny Day 2 (1995)"
    # A history given as items and ratings is the same as the user's own.
    same = rec.score(list(zip(items, ratings, strict=True)), ["2", "3"])
    assert [s.score for s in same] == [s.score for s in scored]
    # An empty history works; plain ids count as liked.
    assert len(rec.score([], ["2"])) == 1 and len(rec.score(["4", "6"], ["2"])) == 1
    # A rating off the run's scale is refused: the prompt reads only above or below the like threshold, so a
    # 0/1 flag's 1 ("liked") asked of 1-5 data was a dislike without a word (its own ratings all pass).
    low, high = rec.rating_scale
    rated = pl.read_csv(Path(cfg.data.source) / "u.data", separator="\t", has_header=False)[:, 2]
    assert (low, high) == (rated.min(), rated.max())  # the data's, not only what histories keep
    for off in (low - 0.5, high + 5):
        with pytest.raises(
            EvoloraError, match=rf"rating of '2' is {off}, outside the run's ratings, {low:g} to {high:g}"
        ):
            rec.score([("2", off)], ["3"])
        with pytest.raises(EvoloraError, match="outside the run's ratings"):
            rec.score({"2": off}, ["3"])
    assert len(rec.score([("2", low), ("4", high)], ["3"])) == 1
    top = rec.recommend(user=user, items=["2", "3", "4", "5"], k=2)
    assert len(top) == 2 and top[0].score >= top[1].score
    with pytest.raises(EvoloraError, match=r"unknown item\(s\) \['nope'\]"):
        rec.score(["nope"], ["2"])
    with pytest.raises(EvoloraError, match="unknown user"):
        rec.score(user="no-such-user", items=["2"])
    with pytest.raises(EvoloraError, match="ranks given candidates"):
        rec.recommend(user=user)
    # A string is iterable: it must not be read as one-letter item ids.
    with pytest.raises(EvoloraError, match="items: a list of item ids, not the string '23'"):
        rec.score(user=user, items="23")
    with pytest.raises(EvoloraError, match="items: a list of item ids, not the string"):
        rec.recommend(user=user, items="23")
    with pytest.raises(EvoloraError, match=r"history: a list of item ids .* not the string '23'"):
        rec.score("23", ["2"])
    # A rating that is not a number, or an entry that is no pair, is an error naming it.
    # A wrong type is a one-line error naming the argument, not a TypeError from inside.
    for ask, named in [
        (lambda: rec.recommend(user=user, items=["2", "3"], k="2"), "k='2': ask for a whole number"),
        (lambda: rec.recommend(user=user, items=["2", "3", "4"], k=2.5), "k=2.5: ask for a whole number"),
        (lambda: rec.recommend(user=user, items=["2"], k=None), "k=None"),
        (lambda: rec.rank_many([(None, ["2", "3"], -1, user)]), "k=-1"),  # it dropped the last item
        (lambda: rec.score(user=user, items=None), "items: a list of item ids, not None"),
        (lambda: rec.score(5, ["2"]), "history: a list of item ids or .* not 5"),
        (lambda: rec.recommend(user=user, items=[], k=2), "give at least one candidate"),  # it gave []
    ]:
        with pytest.raises(EvoloraError, match=named):
            ask()
    root = Path(cfg.output_dir) / cfg.name
    with pytest.raises(ConfigError, match="give a stage or a version, not both"):
        evolora.Recommender.load(root, method="finetune", stage=1, version=0)  # stage was ignored
    with pytest.raises(ConfigError, match="version='0': a version number"):
        evolora.Recommender.load(root, method="finetune", version="0")
    for history, named in [
        ([("4", "five")], "the rating of '4' is 'five'"),
        ([("4", float("nan"))], "the rating of '4' is nan"),
        ({"4": None}, "the rating of '4' is None"),
        ([("4", 5, 1)], r"\('4', 5, 1\) is neither an item id nor"),
        # read as numbers before: True as the rating 1 (a dislike), "5" as 5 (the CLI and server refuse both)
        ([("4", True)], "the rating of '4' is True, a label, which only a run on a 0/1 label column takes"),
        ([("4", "5")], "the rating of '4' is '5', not a number"),
        # past a float's range: it raised OverflowError
        ([("4", 10**400)], "the rating of '4' is a number past a float's range, not a rating"),
    ]:
        with pytest.raises(EvoloraError, match=named):
            rec.score(history, ["2"])
    for rating in (4, 4.0, np.int64(4), np.float32(4.0)):  # numbers of any kind are ratings
        assert rec.score([("4", rating)], ["2"])[0].score == rec.score([("4", 4)], ["2"])[0].score
    # Ids copied from a data file with spaces at their ends are the run's (the file's ids are read without)
    assert rec.score(user=np.int64(int(user)), items=[2, 3]) == scored  # ids as numbers: their strings
    padded = rec.score(user=f" {user}\t", items=["2 ", "\u00a03"])
    assert [(s.item, s.score) for s in padded] == [(s.item, s.score) for s in scored]
    assert rec.history_of(f"{user} ") == (items, ratings) and rec.seen_by(f"{user} ") == rec.seen_by(user)
    assert rec.score({"4 ": 5}, ["2"]) == rec.score({"4": 5}, ["2"])
    assert rec.score([(" 4", 5)], ["2"]) == rec.score([("4", 5)], ["2"]) == rec.score([" 4"], ["2"])
    frame = samples_of(cfg, 1, np.arange(3))
    spaced = frame.with_columns(
        pl.col("item_id") + " ", pl.col("hist_items").list.eval(pl.lit(" ") + pl.element())
    )
    np.testing.assert_array_equal(rec.predict_samples(spaced), rec.predict_samples(frame))
    # an id whose accents are encoded otherwise (NFD for the run's NFC) looks the same: the error says so
    rec._histories["Zo\u00eb"] = rec._histories[user]
    with pytest.raises(EvoloraError, match="'Zoe\u0308' is the run's 'Zo\u00eb' with its accents encoded"):
        rec.history_of("Zoe\u0308")


def test_recommendations_leave_out_every_item_rated_not_only_the_history_read(ctr_run) -> None:
    """The model reads a user's latest `task.history_len` items; what they rated before is seen too."""
    cfg, _ = ctr_run
    rec = evolora.Recommender.load(Path(cfg.output_dir) / cfg.name, method="finetune")
    staged = prepare_data(cfg).staged
    # next_stage: the last stage is data the run read (and tested on), though no model trained on it
    assert rec.eval_stage == rec.stage + 1 == staged["stage"].max()
    last = set(staged.filter(pl.col("stage") == rec.eval_stage)["user_id"].to_list())
    rated = (
        staged.filter(pl.col("stage") <= rec.eval_stage).group_by("user_id").agg(pl.col("item_id").unique())
    )
    keep = rec._task.table.history_len
    user, everything = next((u, set(i)) for u, i in rated.iter_rows() if len(set(i)) > keep and u in last)
    read = set(rec.history_of(user)[0])
    older = sorted(everything - read)
    assert older and len(read) <= keep
    fresh = sorted(rec.known_items - everything)[:2]
    assert rec.seen_by(user) == everything
    ranked = rec.rank_many([(None, [*older, *fresh], 5, user)])[0]
    assert sorted(s.item for s in ranked.items) == fresh and ranked.left_out_seen == older
    everyone = rec.recommend(user=user, items=[*older, *fresh], k=len(older) + 2, exclude_seen=False)
    assert sorted(s.item for s in everyone) == sorted([*older, *fresh])
    # A history given longer than the model reads: every item of it is seen.
    history = sorted(rec.known_items)[: keep + 2]
    ranked = rec.rank_many([(history, sorted(rec.known_items)[: keep + 4], 8, None)])[0]
    assert ranked.left_out_seen == history and len(ranked.items) == 2


def _beams_searched_many(rec: evolora.Recommender, queries: list) -> tuple[list[int], list]:
    """The beam widths of the passes `rec.recommend_many(queries)` makes, and its answers."""
    searched: list[int] = []
    predict = rec._predict

    def counted(frame: pl.DataFrame, settings: dict) -> object:
        searched.append(settings["beams"])
        return predict(frame, settings)

    rec._predict = counted  # type: ignore[method-assign]
    try:
        answers = rec.recommend_many(queries)
    finally:
        del rec._predict
    return searched, answers


def _beams_searched(rec: evolora.Recommender, history: list[str], k: int) -> list[int]:
    """The beam widths of the searches `rec.recommend(history, k=k)` makes (k items answered)."""
    searched, (answer,) = _beams_searched_many(rec, [(history, k, None)])
    assert len(answer) == k
    return searched


def test_next_item_and_conventional_runs_recommend(tmp_path: Path) -> None:
    peso = write_peso_cycle(tmp_path / "cycle")
    over = {
        **SMALL,
        "task.name": "next_item",
        "task.history_len": 8,
        "task.template": "peso",
        "protocol": "leave_last_out",
        "eval.batch_size": 8,
        "strategies": "[finetune, {name: lsat, long_stages: 1, grid: [0.0, 1.0]}]",
    }
    cfg = tiny_config(peso, tmp_path / "llm", **over)
    run_experiment(cfg)
    root = Path(cfg.output_dir) / cfg.name
    for method in ("finetune", "lsat"):
        rec = evolora.Recommender.load(root, method=method, stage=2)
        stored = load_npz(run_dir_of(cfg, method, 0) / "stage-2" / "predictions.npz")
        got = rec.predict_samples(samples_of(cfg, 2, stored["rows"]))
        np.testing.assert_array_equal(got.items, stored["items"])
        np.testing.assert_allclose(got.scores, stored["scores"], atol=1e-6)
        top = rec.recommend(["1", "2", "3"], k=12)
        assert len(top) == 12 and len({s.item for s in top}) == 12
        assert not {"1", "2", "3"} & {s.item for s in top}  # seen items left out
        assert all(a.score >= b.score for a, b in itertools.pairwise(top))
        # k past the catalogue: every item not in the history, once (the search is no wider than it)
        everything = rec.recommend(["1", "2", "3"], k=10 * len(rec.known_items))
        assert sorted(s.item for s in everything) == sorted(set(rec.known_items) - {"1", "2", "3"})
        # A history longer than the model reads (8): all of it is left out, however many items asked.
        long = sorted(rec.known_items)[:10]
        rest = rec.recommend(long, k=len(rec.known_items))
        assert sorted(s.item for s in rest) == sorted(set(rec.known_items) - set(long))
        assert len(rec.recommend(long, k=3)) == 3
        # The seen items are kept out of the search, not filtered after it: k beams (or the run's), however
        # long the history (k + 10 beams before, and a second search where seen items took them).
        assert _beams_searched(rec, long, k=3) == [max(3, cfg.task.beams)]
        # An answer does not depend on the queries it is batched with (the server batches its clients'):
        # each query's search is as wide as it needs, not as the widest beside it.
        for user in rec.known_users[:4]:
            alone = rec.recommend(user=user, k=12)
            beside = rec.recommend_many([(None, 12, user), (["1", "2", "3"], 25, None)])[0]
            assert [(s.item, s.score) for s in beside] == [(s.item, s.score) for s in alone], user
        with pytest.raises(EvoloraError, match="needs a CTR run"):
            rec.score(["1"], ["2"])
        unbounded = rec.recommend_many([(["1"], cfg.task.beams, None), (["2", "3"], cfg.task.beams, None)])
        # A search too wide for memory is refused with what allows it (unbounded, a whole 39k-item
        # catalogue asked of SmolLM2 would hold about 31 GB of scores).
        vocabulary = rec._vocabulary()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(evolora.api, "MAX_BEAM_SCORES", cfg.task.beams * vocabulary)
            assert len(rec.recommend(["1"], k=cfg.task.beams)) == cfg.task.beams
            asked = cfg.task.beams + 1
            allowed = rf"here {asked}; this model's {vocabulary} tokens allow {cfg.task.beams} "
            with pytest.raises(EvoloraError, match=rf"k={asked}: .*{allowed}"):
                rec.recommend(["1"], k=asked)
            # queries searched together hold all their beams at once: one a pass here, the same answers
            asked_many = [(["1"], cfg.task.beams, None), (["2", "3"], cfg.task.beams, None)]
            passes = _beams_searched_many(rec, asked_many)
            assert passes[0] == [cfg.task.beams, cfg.task.beams]
            for apart, together in zip(passes[1], unbounded, strict=True):  # (other batch shapes: rounding)
                assert [s.item for s in apart] == [s.item for s in together]
                assert [s.score for s in apart] == pytest.approx([s.score for s in together], abs=1e-4)
    conv = tiny_config(
        peso, tmp_path / "conv", **{**over, "model.name": "sasrec", "strategies": "[finetune]"}
    )
    run_experiment(conv)
    rec = evolora.Recommender.load(Path(conv.output_dir) / conv.name)
    stored = load_npz(run_dir_of(conv, "sasrec-finetune", 0) / "stage-3" / "predictions.npz")
    got = rec.predict_samples(samples_of(conv, 3, stored["rows"]))
    np.testing.assert_array_equal(got.items, stored["items"])
    # users the model has no row for are its cold user, as a query's history without a user; stages are
    # the run's (a traceback of polars or numpy before)
    some = samples_of(conv, 3, stored["rows"][:4])
    ghosts = rec.predict_samples(some.with_columns(user_id=pl.lit("ghost")))
    cold = rec.predict_samples(some.with_columns(user_id=pl.lit("")))
    np.testing.assert_array_equal(ghosts.items, cold.items)
    with pytest.raises(EvoloraError, match=r"stage 9 is not one of the run's stages 1\.\.3"):
        rec.predict_samples(some.with_columns(stage=pl.lit(9)))
    top = rec.recommend(user=rec.known_users[0], k=5)
    assert len(top) == 5
    # a model that reads user ids takes one copied with spaces at its ends as the run's (a polars error)
    assert rec.recommend(user=f" {rec.known_users[0]} ", k=5) == top
    padded = some.with_columns(pl.col("user_id") + " ")
    np.testing.assert_array_equal(rec.predict_samples(padded).items, rec.predict_samples(some).items)
    for flag in ("no", None):  # a TypeError of `k + len(h) * "no"` before
        with pytest.raises(EvoloraError, match=rf"exclude_seen={flag!r}: True or False"):
            rec.recommend(user=rec.known_users[0], k=5, exclude_seen=flag)
    rated = set(prepare_data(conv).staged.filter(pl.col("user_id") == rec.known_users[0])["item_id"])
    every = rec.recommend(user=rec.known_users[0], k=len(rec.known_items))
    assert sorted(s.item for s in every) == sorted(set(rec.known_items) - rated)
    from typer.testing import CliRunner

    from evolora.cli import app

    args = ["recommend", str(Path(conv.output_dir) / conv.name), "--user", rec.known_users[0]]
    result = CliRunner().invoke(app, [*args, "--items", "1,2"])
    assert result.exit_code == 2 and "--items ranks a CTR run's candidates" in result.output, result.output
    assert CliRunner().invoke(app, [*args, "-k", "3"]).exit_code == 0
    # No `left_out_seen: []` claiming nothing was left out: the seen items never entered the search.
    answer = json.loads(CliRunner().invoke(app, [*args, "-k", "3", "--json"]).output)
    assert len(answer["items"]) == 3 and "left_out_seen" not in answer
    result = CliRunner().invoke(app, [*args, "-k", "500"])  # more than the catalogue: said, not silent
    n = len(rec.known_items) - len(rated)
    assert f"-k 500: {n} items are all this run can recommend here (items seen left out" in result.output


def test_a_levelwise_run_recommends_no_seen_item(tmp_path: Path) -> None:
    """A levelwise search keeps nothing out (it walks the ID levels, not the trie): seen items are filtered
    after a search k + |seen| wide. Kept out of the search alone, every item of the history came back."""
    over = {
        **SMALL, "task.name": "next_item", "task.history_len": 8, "task.template": "peso",
        "task.constraint": "levelwise", "protocol": "leave_last_out", "strategies": "[finetune]",
    }  # fmt: skip
    cfg = tiny_config(write_peso_cycle(tmp_path / "cycle"), tmp_path / "llm", **over)
    run_experiment(cfg)
    rec = evolora.Recommender.load(Path(cfg.output_dir) / cfg.name)
    history = sorted(rec.known_items)[:10]
    assert not set(history) & {s.item for s in rec.recommend(history, k=12)}
    for user in rec.known_users[:3]:
        assert not rec.seen_by(user) & {s.item for s in rec.recommend(user=user, k=10)}, user


def test_run_takes_overrides(sunny_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(sunny_dir, tmp_path, **SMALL)
    results = evolora.run(cfg, train={"epochs": 1}, **{"strategies": ["frozen"], "name": "api-run"})
    assert [r["method"] for r in results] == ["frozen"] and results[0]["complete"]
    assert (tmp_path / "api-run" / "inference" / "bundle.json").is_file()
    # A mapping of sections, as the YAML holds them, is a config too.
    again = evolora.run(cfg.model_dump(mode="json"), name="api-run", strategies=["frozen"])
    assert again[0]["summary"]["mean"] == results[0]["summary"]["mean"]
    # Problems name the Python argument that caused them, not a command-line flag.
    with pytest.raises(ConfigError, match=r"train.epochs: .*\(given by train.epochs=0\)"):
        evolora.run(cfg, train={"epochs": 0})
    with pytest.raises(ConfigError, match=r"run\(config\): a YAML path, a RunConfig or a mapping"):
        evolora.run(["frozen"])
    assert evolora.api.run is evolora.run  # `evolora.api` without importing it first


def test_run_reads_python_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Paths, numpy numbers and tuples are settings as their plain values are; a mapping under a dotted
    key replaces the setting whole, as --set does, while a section's mapping sets only the keys it names."""
    built = []
    calls = []
    monkeypatch.setattr(
        "evolora.api.run_experiment", lambda cfg, **kw: built.append(cfg) or calls.append(kw) or []
    )
    cfg = tiny_config(Path(__file__).parent / "data" / "example_log.csv", tmp_path, **EXAMPLE_TABLE)
    evolora.run(
        cfg, output_dir=tmp_path / "out", train={"epochs": np.int64(3), "lr": np.float32(0.5)}, seeds=(1, 2)
    )
    got = built[-1]
    assert got.output_dir == str(tmp_path / "out") and got.train.epochs == 3 and got.train.lr == 0.5
    assert got.seeds == [1, 2] and got.train.batch_size == cfg.train.batch_size  # the rest as it was
    evolora.run({**cfg.model_dump(mode="json"), "output_dir": tmp_path / "m"})
    assert built[-1].output_dir == str(tmp_path / "m")
    columns = {"user": "uid", "item": "iid", "time": "ts"}
    evolora.run(cfg, **{"data.columns": columns})  # replaced whole, as --set data.columns={...} does
    assert built[-1].data.columns.rating is None and built[-1].data.columns.title is None
    evolora.run(cfg, data={"columns": {"user": "u"}}, model={"lora": {"r": 4}})  # merged, at any depth
    got = built[-1]
    assert got.data.columns.user == "u" and got.data.columns.rating == cfg.data.columns.rating
    assert got.model.lora.r == 4 and got.model.lora.target_modules == cfg.model.lora.target_modules
    with pytest.raises(ConfigError, match="a setting is a number, a string, a list or a mapping"):
        evolora.run(cfg, name=object())
    # errors name the Python argument, not a command-line flag; overwrite and jobs are run()'s own
    for kwargs, named in [
        ({"train.epochs.x": 1}, r"^'train.epochs.x=1': 'epochs' is not a section"),
        ({"strategies.peso.lam": 5}, r"^'strategies.peso.lam=5': no strategy labelled 'peso'"),
        ({"jobs": 0}, r"run\(jobs=0\): give 1 or more"),
    ]:
        with pytest.raises(ConfigError, match=named):
            evolora.run(cfg, **kwargs)
    evolora.run(cfg, overwrite=True, jobs=2)
    assert calls[-1] == {"overwrite": True, "jobs": 2}


def test_report_arguments_are_checked(ctr_run) -> None:
    cfg, _ = ctr_run
    root = Path(cfg.output_dir) / cfg.name
    assert list(evolora.report(root, metrics="auc").data["metrics"]) == ["auc"]  # not 'a', 'u', 'c'
    for ask, named in [
        (lambda: evolora.report([]), r"report\(paths\): give at least one"),
        (lambda: evolora.report(5), r"report\(paths\): a folder or a list of folders, not 5"),
        (lambda: evolora.report(root, metrics=[]), r"report\(metrics=\[\]\)"),
        (lambda: evolora.report(root, metrics=["nope"]), "metrics=nope: not recorded by these runs"),
        (lambda: evolora.report(root, baseline="nope"), "baseline=nope: no such method"),
        (
            lambda: evolora.report(root / "config.yaml"),
            "config.yaml: a file, not a run folder",
        ),  # was 'no such'
        (lambda: evolora.report(root / "nothing"), "nothing: no such run folder"),
    ]:
        with pytest.raises(EvoloraError, match=named):
            ask()


def test_queries_of_the_wrong_shape_are_one_line_errors(ctr_run) -> None:
    cfg, _ = ctr_run
    root = Path(cfg.output_dir) / cfg.name
    rec = evolora.Recommender.load(root, method="finetune")
    user = rec.known_users[0]
    with pytest.raises(EvoloraError, match=r"score_many: each query is a tuple \(history, items, user\)"):
        rec.score_many([(None, ["2"])])
    with pytest.raises(EvoloraError, match=r"rank_many: each query is a tuple \(history, items, k, user\)"):
        rec.rank_many([(None, ["2"], user)])
    with pytest.raises(EvoloraError, match="not a set"):
        rec.score({"4", "6"}, ["2"])
    # ids given as numbers are their strings everywhere a query takes them
    assert rec.history_of(int(user)) == rec.history_of(user)  # (the data's user ids are numbers)
    rec.check(user=user, items=[2])
    with pytest.raises(EvoloraError, match=r"user: an id \(a string\), not \['1'\]"):
        rec.history_of(["1"])
    # predict_samples takes the columns its docstring names (the sample table's others, e.g. label, filled)
    hist = rec.history_of(user)
    frame = pl.DataFrame(
        {"user_id": [user], "item_id": ["2"], "hist_items": [hist[0]], "hist_ratings": [hist[1]],
         "stage": [rec.eval_stage]},
        schema_overrides={"stage": pl.Int32},
    )  # fmt: skip
    assert np.asarray(rec.predict_samples(frame)) == pytest.approx(
        [rec.score(user=user, items=["2"])[0].score]
    )
    with pytest.raises(EvoloraError, match=r"lack the column\(s\) \['hist_ratings'\]"):
        rec.predict_samples(frame.drop("hist_ratings"))
    with pytest.raises(UnknownIdError, match="item_id: 1 unknown item"):
        rec.predict_samples(frame.with_columns(item_id=pl.lit("zzz")))
    with pytest.raises(EvoloraError, match="a polars DataFrame"):
        rec.predict_samples(frame.to_dict())
    # Columns of another shape, and settings that are no task keys or of the wrong type, are one-line
    # errors (a TypeError, a KeyError or a zip error from inside before, or silently ignored).
    for shaped, named in [
        (frame.with_columns(hist_items=pl.lit("2")), "`hist_items` holds a list per row, not String"),
        (frame.with_columns(hist_ratings=pl.lit(["5"])), "`hist_ratings` holds lists of numbers"),
        (frame.with_columns(hist_ratings=pl.lit([5.0, 1.0])), r"row 0 has \d+ hist_items and 2 hist_ratings"),
        (frame.with_columns(item_id=pl.lit(None, pl.Utf8)), "`item_id` of row 0 is or holds a missing"),
        (frame.with_columns(hist_items=pl.lit(["2"]), hist_ratings=pl.lit([float("nan")])), "holds nan"),
    ]:
        with pytest.raises(EvoloraError, match=named):
            rec.predict_samples(shaped)
    for settings, named in [
        (
            {"max_lenght": 20},
            r"max_lenght is no setting of the ctr task \(did you mean max_length\? it takes",
        ),
        ({"max_length": "long"}, "max_length='long': Input should be a valid integer"),
    ]:
        with pytest.raises(EvoloraError, match=named):
            rec.predict_samples(frame, **settings)
    passed: list[dict] = []
    with pytest.MonkeyPatch.context() as patch:  # the values as the config reads them go on, not as given
        patch.setattr(rec, "_predict", lambda frame, settings: passed.append(settings))
        rec.predict_samples(frame, max_length="64", share_prefix="false")
    assert passed == [{"max_length": 64, "share_prefix": False}]
    # every history empty: lists of nulls, as polars types them (refused as "not numbers" at first)
    empty = frame.with_columns(hist_items=pl.lit([], pl.List(pl.Utf8)), hist_ratings=pl.Series([[]]))
    assert len(rec.predict_samples(empty)) == 1
    numbered = frame.with_columns(item_id=pl.lit(2), hist_items=pl.col("hist_items").cast(pl.List(pl.Int64)))
    assert np.asarray(rec.predict_samples(numbered)) == pytest.approx(np.asarray(rec.predict_samples(frame)))
    with pytest.raises(EvoloraError, match=r"exclude_seen='false': True or False"):  # truthy: read as True
        rec.recommend(user=user, items=["2"], exclude_seen="false")
    with pytest.raises(ConfigError, match=r"run\(overwrite='false'\): True or False"):
        evolora.run(cfg, overwrite="false")
    for batch in (rec.score_many, rec.rank_many):
        with pytest.raises(EvoloraError, match=r"_many: a list of queries \(tuples\), not None"):
            batch(None)
    with pytest.raises(ConfigError, match=r"run_dir: a run's folder \(a path\), not None"):
        evolora.Recommender.load(None)
    with pytest.raises(ConfigError, match=r"seed='0': a seed number"):
        evolora.Recommender.load(root, method="finetune", seed="0")
    # neither a user nor a history is a mistake (as at the CLI and the server), not an empty history
    with pytest.raises(
        EvoloraError, match=r"give a user or a history \(one of them; an empty history is \[\]\)"
    ):
        rec.score(items=["2"])
    assert [s.item for s in rec.score([], ["2"])] == ["2"]
    # item ids given as numbers are the same items as their strings
    ranked = rec.rank_many([(None, [2, 3], 2, user)])[0]
    assert sorted([*(s.item for s in ranked.items), *ranked.left_out_seen]) == ["2", "3"]
    assert [s.item for s in rec.score_many([(None, [2], user)])[0]] == ["2"]
    # stages without a model of the run say which it has
    for stage in (0, -1, 3):
        with pytest.raises(
            ConfigError, match=rf"no model after stage {stage}: the run trained stages \[1, 2\]"
        ):
            evolora.Recommender.load(root, method="finetune", stage=stage)
    with pytest.raises(ConfigError, match="next_stage only evaluates the last stage"):
        evolora.Recommender.load(root, method="finetune", stage=3)


def test_an_unfinished_run_says_so(ctr_run, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A run stopped after stage 1 of [1, 2]: stage 2 is missing because the run has not finished."""
    import shutil

    cfg, _ = ctr_run
    root = tmp_path / cfg.name
    shutil.copytree(Path(cfg.output_dir) / cfg.name, root)
    path = root / "finetune" / "seed0" / "results.json"
    results = json.loads(path.read_text())
    path.write_text(json.dumps({**results, "stages": results["stages"][:1], "complete": False}))
    with pytest.raises(ConfigError, match=r"trained stages \[1\] of \[1, 2\]: it has not finished"):
        evolora.Recommender.load(root, method="finetune", stage=2)
    with caplog.at_level("WARNING", logger="evolora"):
        assert evolora.Recommender.load(root, method="finetune").stage == 1
    assert "has not finished its stages: this is its model after stage 1" in caplog.text


def test_damaged_run_files_are_named_not_a_traceback(ctr_run, tmp_path: Path) -> None:
    """A truncated inference table (a polars ComputeError's traceback before) and a results.json that is
    JSON but not a run's record (a KeyError) are one-line errors naming the file."""
    import shutil

    from typer.testing import CliRunner

    from evolora.cli import app
    from evolora.errors import DamagedFileError

    cfg, _ = ctr_run
    root = tmp_path / cfg.name
    shutil.copytree(Path(cfg.output_dir) / cfg.name, root)
    table = root / "inference" / "histories.parquet"
    table.write_bytes(table.read_bytes()[:100])
    with pytest.raises(DamagedFileError, match=r"histories\.parquet is damaged or truncated .*Delete the"):
        evolora.Recommender.load(root, method="finetune")
    args = ["recommend", str(root), "--method", "finetune", "--history", "1", "--items", "2"]
    shown = CliRunner().invoke(app, args)
    assert shown.exit_code == 2 and "histories.parquet is damaged" in shown.output, shown.output
    table.unlink()  # gone: said so, not "damaged or truncated (No such file ...)"
    with pytest.raises(DamagedFileError, match=r"histories\.parquet is missing\. Delete the inference"):
        evolora.Recommender.load(root, method="finetune")
    results = root / "finetune" / "seed0" / "results.json"
    recorded = results.read_text()
    results.write_text('{"x": 1}')
    with pytest.raises(DamagedFileError, match=r"results\.json is not an evolora results\.json"):
        evolora.Recommender.load(root, method="finetune")
    with pytest.raises(DamagedFileError, match=r"results\.json is not an evolora results\.json"):
        update_run(root, results, method="finetune")
    # a stage record without its eval stage: a KeyError in `evolora report` before
    results.write_text(json.dumps({"method": "finetune", "seed": 0, "stages": [{"train_stage": 1}]}))
    shown = CliRunner().invoke(app, ["report", str(root), "--out", str(tmp_path / "report")])
    assert shown.exit_code == 2, shown.output
    assert "a stage without its train_stage, eval_stage" in shown.output, shown.output
    # versions.json of another shape: a TypeError in every command reading it, or an empty list
    results.write_text(recorded)
    registry = root / "deploy" / "finetune-seed0" / "versions.json"
    registry.parent.mkdir(parents=True)
    for text, problem in [
        ("[]", "a JSON list, not an object"),
        ('{"versions": {}, "promoted": 0}', "'versions' is not a list of versions"),
        ('{"versions": [{"id": 0}], "promoted": 0}', "a version of other fields: ['id']"),
    ]:
        registry.write_text(text)
        shown = CliRunner().invoke(app, ["versions", str(root), "--method", "finetune"])
        assert shown.exit_code == 2, shown.output
        said = " ".join(shown.output.split())
        assert f"versions.json is damaged ({problem}). It is rewritten" in said, said


def test_the_recommend_command(ctr_run) -> None:

    from typer.testing import CliRunner

    from evolora.cli import app

    cfg, _ = ctr_run
    root = str(Path(cfg.output_dir) / cfg.name)
    runner = CliRunner()
    args = [
        "recommend",
        root,
        "--method",
        "finetune",
        "--user",
        "1",
        "--items",
        "2,3,4,5",
        "-k",
        "2",
        "--json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["method"] == "finetune" and answer["stage"] == 2 and answer["task"] == "ctr"
    assert answer["user"] == "1" and answer["score"] == "P(like)"
    assert len(answer["items"]) == 2 and set(answer["items"][0]) == {"item", "score", "title"}
    assert answer["items"][0]["score"] >= answer["items"][1]["score"]
    # a user id copied with spaces at its ends is answered, and echoed as the run holds it
    padded = json.loads(runner.invoke(app, [*args[:5], " 1 ", *args[6:]]).output)
    assert padded["user"] == "1" and padded["items"] == answer["items"]
    table = runner.invoke(
        app, ["recommend", root, "--method", "finetune", "--history", "2:5,3:1", "--items", "4,6"]
    )
    assert table.exit_code == 0 and "Sunny Day 4" in table.output
    plain = runner.invoke(
        app, ["recommend", root, "--method", "finetune", "--history", "2,3", "--items", "4,6", "--json"]
    )
    assert plain.exit_code == 0, plain.output
    assert json.loads(plain.output)["history"] == ["2", "3"]
    # A candidate already in the history is left out, and the answer says which (not silently).
    seen = runner.invoke(
        app, ["recommend", root, "--method", "finetune", "--history", "2,3", "--items", "3,4"]
    )
    assert seen.exit_code == 0 and "left out as seen (in the history): 3 (--include-seen" in seen.output
    kept = ["recommend", root, "--method", "finetune", "--history", "2,3", "--items", "3,4", "--json"]
    # -k past the candidates ranks them all (a CTR ranking costs nothing per k; refused past 1000 before)
    assert len(json.loads(runner.invoke(app, [*kept, "-k", "5000"]).output)["items"]) == 1
    answer = json.loads(runner.invoke(app, [*kept, "--include-seen"]).output)
    assert {s["item"] for s in answer["items"]} == {"3", "4"} and answer["left_out_seen"] == []
    assert json.loads(runner.invoke(app, kept).output)["left_out_seen"] == ["3"]
    # The JSON forms (for ids holding commas or colons) ask the same thing.
    commas = runner.invoke(app, [*args[:4], "--history", "2:5,3:1", "--items", "4,6", "--json"])
    as_json = runner.invoke(
        app, [*args[:4], "--history", '[["2", 5], ["3", 1]]', "--items", '["4", "6"]', "--json"]
    )
    assert commas.exit_code == as_json.exit_code == 0, as_json.output
    assert json.loads(commas.output) == json.loads(as_json.output)
    for bad, message in [
        (
            ["--method", "finetune", "--history", "[2]", "--items", "3"],
            "neither an item id nor [item id, rating]",
        ),
        (
            ["--method", "finetune", "--history", '["2", ', "--items", "3"],
            "read as a JSON list, and this is none",
        ),
        # JSON gone wrong is told where, not given an example made of its pieces
        (
            ["--method", "finetune", "--history", '["2", ', "--items", "3"],
            "none (Expecting value at character 6)\n",
        ),
        # an id of the comma form that starts with "[" is read as JSON: told how to give it
        (
            ["--method", "finetune", "--user", "1", "--items", "[NEW] mug,2"],
            """an id that starts with [ goes in one, e.g. --items '["[NEW] mug", "2"]'""",
        ),
        (
            ["--method", "finetune", "--history", "[NEW] mug:5,2", "--items", "2"],
            """e.g. --history '[["[NEW] mug", 5.0], "2"]'""",
        ),
        (["--method", "finetune", "--history", "2", "--items", "[4]"], "4 is not an item id"),
        (["--method", "finetune", "--items", "2"], "give --user or --history"),
        (["--method", "finetune", "--user", "nobody", "--items", "2"], "unknown user 'nobody'"),
        (["--method", "finetune", "--user", "1", "--items", "2", "-k", "0"], "-k 0"),
        (["--user", "1", "--items", "2"], "choose a method"),
        (["--method", "finetune", "--history", "2:x", "--items", "3"], "not item:rating"),
        (["--method", "finetune", "--user", "1"], "a CTR run ranks the items it is given: add --items"),
        (
            ["--method", "finetune", "--user", "1", "--items", "2", "--stage", "1", "--version", "0"],
            "not both",
        ),
        *[
            (["--method", "finetune", "--user", "1", "--items", empty], "no item ids in it")
            for empty in ("", ",", "[]", " , ")
        ],
    ]:
        result = runner.invoke(app, ["recommend", root, *bad])
        assert result.exit_code == 2 and message in result.output, (bad, result.output)
        assert "Traceback" not in result.output


def test_the_recommend_command_shows_its_loading_and_scoring(ctr_run, monkeypatch, tmp_path: Path) -> None:
    """Loading a run takes seconds (about 10 for SmolLM2) and scoring candidates seconds each: `recommend`
    shows a bar for each on stderr (it said nothing before its answer)."""
    from rich.progress import Progress
    from typer.testing import CliRunner

    from evolora.cli import app

    shown = []
    add_task = Progress.add_task

    def watched(self, description, *args, **kwargs):
        shown.append(description)
        return add_task(self, description, *args, **kwargs)

    monkeypatch.setattr(Progress, "add_task", watched)
    cfg, _ = ctr_run
    root = str(Path(cfg.output_dir) / cfg.name)
    args = ["recommend", root, "--method", "finetune", "--user", "1", "--items", "2,3,4", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["method"] == "finetune"  # the bars keep off the JSON on stdout
    assert shown[0] == "loading finetune (stage 2)" and shown[1:] == ["scoring"], shown
    # export and export-user-adapter load the run too (a merged model's writing takes longer still)
    for args, loaded in (
        (
            ["export", root, "--method", "finetune", "--out", str(tmp_path / "e")],
            "loading finetune (stage 2)",
        ),
        (
            ["export-user-adapter", root, "1", "--method", "reclora", "--out", str(tmp_path / "u")],
            "loading reclora",
        ),
    ):
        shown.clear()
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert any(d.startswith(loaded) for d in shown), (args[0], shown)


def test_the_rating_scale_a_query_is_checked_against() -> None:
    """The run's lowest and highest rating; where data.min_rating left the rows below it out, their
    ratings are still on the scale (a 1 of 5-star data is a dislike, as update drops such rows): no lowest.
    Data without ratings checks none; of one value (implicit feedback), ids alone are asked."""
    from evolora.bundle import rating_range
    from evolora.queries import history_pairs

    ratings = pl.Series([2.0, 5.0, 3.0, None])
    assert rating_range(ratings, None) == [2.0, 5.0] and rating_range(ratings, 2.0) == [None, 5.0]
    assert rating_range(pl.Series([None], dtype=pl.Float64), None) is None
    assert history_pairs([("a", 1), "b"], 4.0, (-np.inf, 5.0)) == [("a", 1.0), ("b", 4.0)]
    with pytest.raises(EvoloraError, match=r"rating of 'a' is 6, outside the run's ratings, at most 5"):
        history_pairs([("a", 6)], 4.0, (-np.inf, 5.0))
    # implicit feedback (every rating one value): ids alone; a rating other than that value was read as a
    # dislike the model never saw
    assert history_pairs(["a", ("b", 1)], 2.0, (1.0, 1.0)) == [("a", 2.0), ("b", 1.0)]
    with pytest.raises(EvoloraError, match=r"rating of 'a' is 0, and this run's data has no ratings"):
        history_pairs({"a": 0}, 2.0, (1.0, 1.0))
    # a 0/1 label column: a rating is a label, true/false as the column may hold them; 0.3 was read as a
    # dislike, true refused as no number
    labels = history_pairs([("a", True), ("b", 0), ("c", np.False_), "d"], 1.5, (0.0, 1.0), "clicked")
    assert labels == [("a", 1.0), ("b", 0.0), ("c", 0.0), ("d", 1.5)]
    for off in (0.3, 5, "1", None):
        with pytest.raises(EvoloraError, match=r"this run's data has labels \('clicked'\): give 0 or 1"):
            history_pairs([("a", off)], 1.5, (0.0, 1.0), "clicked")
    with pytest.raises(EvoloraError, match="the rating of 'a' is True, a label, which only a run on a 0/1"):
        history_pairs([("a", True)], 4.0, (1.0, 5.0))


def test_history_ids_with_commas_and_colons() -> None:
    from evolora.cli.recommend import _parse_history, _parse_items

    # labels as the file may hold them (a label run takes them, any other refuses them as no number)
    assert _parse_history("a:true,b:False") == [("a", True), ("b", False)]
    assert _parse_history('[["a", true], ["b", 0]]') == [("a", True), ("b", 0.0)]

    text = '["Godfather, The (1972)", ["Star Wars: Episode IV - A New Hope (1977)", 4]]'
    assert _parse_history(text) == [
        "Godfather, The (1972)",
        ("Star Wars: Episode IV - A New Hope (1977)", 4.0),
    ]
    assert _parse_items('["Godfather, The (1972)", "Fargo (1996)"]') == [
        "Godfather, The (1972)",
        "Fargo (1996)",
    ]
    assert _parse_history("a:5, b:1") == [("a", 5.0), ("b", 1.0)]
    # an id alone beside item:rating is a like, as in the JSON form (it was "'b' is not item:rating")
    assert _parse_history("a:5,b") == _parse_history('[["a", 5], "b"]') == [("a", 5.0), "b"]
    assert _parse_history("b,a:5") == ["b", ("a", 5.0)]


def test_a_bundle_of_settings_the_experiment_no_longer_has_is_written_anew(
    sunny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An attempt that fails after writing the inference bundle (a strategy's set-up, say) leaves the
    experiment to new settings: the bundle is theirs, not the failed attempt's (recommendations read
    3-item histories from a model trained on 6); a key-less bundle of an older evolora is rebuilt when its
    history length is not the config's."""
    from evolora.continual.loop import StageLoop

    def fails(*args: object, **kwargs: object) -> None:
        raise ConfigError("a failure after the bundle was written")

    failing = tiny_config(sunny_dir, tmp_path, **{**SMALL, "task.history_len": 3}, strategies="[finetune]")
    with pytest.MonkeyPatch.context() as patch, pytest.raises(ConfigError, match="after the bundle"):
        patch.setattr(StageLoop, "run", fails)
        run_experiment(failing)
    root = Path(failing.output_dir) / failing.name
    bundle = root / "inference" / "bundle.json"
    assert json.loads(bundle.read_text())["history_len"] == 3
    cfg = tiny_config(sunny_dir, tmp_path, **{**SMALL, "task.history_len": 6}, strategies="[finetune]")
    run_experiment(cfg)
    assert json.loads(bundle.read_text())["history_len"] == 6
    rec = evolora.Recommender.load(root)
    assert max(len(items) for items, _ in rec._histories.values()) == 6
    old = {k: v for k, v in json.loads(bundle.read_text()).items() if k != "context_key"}
    bundle.write_text(json.dumps({**old, "history_len": 3}))  # as an older evolora's stale bundle
    rec = evolora.Recommender.load(root)
    assert max(len(items) for items, _ in rec._histories.values()) == 6
    assert json.loads(bundle.read_text())["history_len"] == 6
    # older still: no items rated (`seen`), so recommendations showed rated items again; rebuilt too
    histories = root / "inference" / "histories.parquet"
    old = {k: v for k, v in json.loads(bundle.read_text()).items() if k != "context_key"}
    bundle.write_text(json.dumps(old))
    pl.read_parquet(histories).drop("seen").write_parquet(histories)
    evolora.Recommender.load(root)
    assert "seen" in pl.read_parquet(histories).columns
    bundle.write_text(json.dumps(old))
    histories.unlink()  # a bundle missing a file is rebuilt, not a FileNotFoundError
    evolora.Recommender.load(root)
    assert "seen" in pl.read_parquet(histories).columns
    # ... unless its data cannot be read any more: then it serves as it is, and says so
    bundle.write_text(json.dumps(old))
    pl.read_parquet(histories).drop("seen").write_parquet(histories)
    config = root / "config.yaml"
    config.write_text(config.read_text().replace(str(sunny_dir), str(tmp_path / "gone")))
    with caplog.at_level(logging.WARNING, logger="evolora"):
        assert evolora.Recommender.load(root).known_users
    assert "its inference bundle is kept as is: the data cannot be used" in caplog.text
    assert "predates seen items" in caplog.text and "its data could not be read to rebuild it" in caplog.text


def test_a_bundle_written_before_the_data_changed_is_written_anew(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Killed after the inference bundle was written but before any stage, an experiment takes data changed
    in the meantime (nothing was cut from the old): the bundle is made again from the new data, not kept
    with the old titles that `recommend` and `serve` would show. Loading a run whose data changed since
    keeps its bundle and says why it cannot be rebuilt."""
    import shutil

    from tests.helpers import write_sunny_rainy

    data = write_sunny_rainy(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "runs", **SMALL, strategies="[finetune]")
    run_experiment(cfg)
    root = Path(cfg.output_dir) / cfg.name
    for stage in root.glob("*/seed*"):
        shutil.rmtree(stage)  # as if killed before any stage folder
    items = data / "u.item"
    items.write_text(items.read_text(encoding="latin-1").replace("Sunny", "Cloudy"), encoding="latin-1")
    run_experiment(cfg)
    titles = pl.read_parquet(root / "inference" / "items.parquet")["title"].to_list()
    assert any(t.startswith("Cloudy") for t in titles) and not any(t.startswith("Sunny") for t in titles)

    bundle = root / "inference" / "bundle.json"
    bundle.write_text(json.dumps({**json.loads(bundle.read_text()), "data_sha256": "other data"}))
    items.write_text(items.read_text(encoding="latin-1").replace("Cloudy", "Foggy"), encoding="latin-1")
    with caplog.at_level(logging.WARNING, logger="evolora"):
        assert evolora.Recommender.load(root).known_users
    assert "its data files changed since the experiment ran" in caplog.text
    assert not any(
        t.startswith("Foggy") for t in pl.read_parquet(root / "inference" / "items.parquet")["title"]
    )


def test_candidates_left_out_as_seen_are_said(ctr_run, caplog: pytest.LogCaptureFixture) -> None:
    """recommend(items=...) with every candidate one the user rated returns none, and says why."""
    cfg, _ = ctr_run
    rec = evolora.Recommender.load(Path(cfg.output_dir) / cfg.name, method="finetune")
    user = rec.known_users[0]
    seen = sorted(rec.seen_by(user))[:2]
    with caplog.at_level(logging.INFO, logger="evolora"), pytest.warns(UserWarning, match="left out as seen"):
        assert rec.recommend(user=user, items=seen, k=3) == []  # the warning: seen without logging set up
    assert f"2 of the candidates left out as seen ({', '.join(seen)})" in caplog.text
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # some left: the answer is not empty, the log says the rest
        fresh = next(i for i in rec.known_items if i not in rec.seen_by(user))
        assert [s.item for s in rec.recommend(user=user, items=[*seen, fresh], k=3)] == [fresh]


def test_a_run_trained_in_fp16_answers_in_fp32_without_a_gpu(
    ctr_run, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run trained on a CUDA GPU in fp16, loaded on a CPU: fp16 cannot run here and recommend has no
    precision to set, so it was refused ("model.device is cpu ... use fp32"); it answers in fp32 instead."""
    import shutil

    cfg, _ = ctr_run
    root = tmp_path / cfg.name
    shutil.copytree(Path(cfg.output_dir) / cfg.name, root)
    config = root / "config.yaml"
    config.write_text(config.read_text().replace("precision: fp32", "precision: fp16"))
    expected = evolora.Recommender.load(Path(cfg.output_dir) / cfg.name, method="finetune")
    with caplog.at_level(logging.WARNING, logger="evolora"):
        rec = evolora.Recommender.load(root, method="finetune")
    assert "trained in fp16 on a CUDA GPU; without one here it answers in fp32" in caplog.text
    user = rec.known_users[0]
    items = sorted(rec.known_items)[:3]
    assert rec.score(user=user, items=items) == expected.score(user=user, items=items)


def test_a_run_answers_with_the_template_text_it_trained_with(sunny_dir: Path, tmp_path: Path) -> None:
    """A template file (`task.template: a path`) was read again at every load, update and export: edited
    since the run, the answers and the export's prompt changed without a word; moved or deleted, the run
    could not be loaded at all."""
    from evolora.export import export_run

    template = tmp_path / "prompt.txt"
    text = "Liked: {preference}\nDisliked: {unpreference}\nWill the user like {target}?\nAnswer:"
    template.write_text(text, encoding="utf-8")
    over = {**SMALL, "strategies": "[finetune]", "task.template": str(template)}
    cfg = tiny_config(sunny_dir, tmp_path / "runs", **over)
    run_experiment(cfg)
    root = Path(cfg.output_dir) / cfg.name
    assert (root / "template.txt").read_text(encoding="utf-8") == text
    rec = evolora.Recommender.load(root)
    user, items = sorted(rec.known_users)[0], sorted(rec.known_items)[:3]
    before = [s.score for s in rec.score(user=user, items=items)]
    edited = text.replace("Will the user like", "Does this user love")
    template.write_text(edited, encoding="utf-8")
    assert [s.score for s in evolora.Recommender.load(root).score(user=user, items=items)] == before
    template.unlink()  # moved, or left on the machine that trained it
    manifest = json.loads((export_run(root, tmp_path / "export") / "evolora_export.json").read_text())
    assert manifest["prompt"]["template"] == text
    strategy, _, _ = restore_run(root / "finetune" / "seed0")  # export-user-adapter's: rebuilt from its data
    assert strategy.task.template == text
    strategy.teardown()
    # A run of an evolora before template.txt, whose file was edited since: refused, not answered otherwise
    (root / "template.txt").unlink()
    template.write_text(edited, encoding="utf-8")
    with pytest.raises(EvoloraError, match=r"the prompt template .* changed since the experiment ran"):
        evolora.Recommender.load(root)


def test_a_run_folder_outside_its_experiment_is_refused(ctr_run, tmp_path: Path) -> None:
    """A run folder is read with its experiment's config.yaml and bundle two levels up: copied out alone,
    the error was "config file not found" naming shipped configs; under another experiment's folder it
    answered from that one's config and data."""
    import shutil

    cfg, _ = ctr_run
    root = Path(cfg.output_dir) / cfg.name
    alone = tmp_path / "copy" / "seed0"
    shutil.copytree(root / "finetune" / "seed0", alone)
    with pytest.raises(ConfigError, match=r"seed0 is a run folder outside its experiment: .*finetune/seed0"):
        evolora.Recommender.load(alone)
    other = tmp_path / "other"
    shutil.copytree(root, other, ignore=shutil.ignore_patterns("stage-*", "inference"))
    marker = json.loads((other / "experiment.json").read_text())
    marker["data_files"]["sha256"] = "0" * 64  # another experiment's data
    (other / "experiment.json").write_text(json.dumps(marker))
    with pytest.raises(ConfigError, match=r"was not run by the experiment in .*other: it ran on other data"):
        evolora.Recommender.load(other / "finetune" / "seed0")
    # Legitimate layouts stay readable (review): a run folder that is a link to another disk, one given as
    # "." or "../seed0" from inside, and an experiment whose experiment.json was deleted (as advised)
    linked = tmp_path / "linked"
    shutil.copytree(root, linked, ignore=shutil.ignore_patterns("finetune"))
    (linked / "finetune").mkdir()
    shutil.copytree(root / "finetune" / "seed0", tmp_path / "disk" / "seed0")  # a place of no experiment
    (linked / "finetune" / "seed0").symlink_to(tmp_path / "disk" / "seed0")
    assert locate_run(linked / "finetune" / "seed0", None, None)[1] == linked
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root / "finetune" / "seed0")
        assert locate_run(Path("."), None, None)[1] == root.absolute()
        assert locate_run(Path("../seed0"), None, None)[1] == root.absolute()
    (linked / "experiment.json").unlink()
    assert locate_run(linked / "finetune" / "seed0", None, None)[1] == linked
