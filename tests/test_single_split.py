"""`staging.scheme: single`: one stage, leave-one-out by time (the split peers such as RecBole publish on)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from evolora.config import load_config
from evolora.data.prepare import prepare_data
from evolora.errors import ConfigError
from evolora.eval.report import build_report
from evolora.experiment import run_experiment
from tests.helpers import tiny_config

SINGLE = {
    "staging.scheme": "single",
    "staging.n_stages": "null",
    "protocol": "leave_last_out",
    "task.name": "next_item",
    "task.template": "peso",
    "task.history_len": 8,
    "task.min_history": 0,
    "model.name": "gru4rec",
    "model.conventional.dim": 16,
    "train.samples_per_stage": "null",
    "train.valid_samples": "null",
    "train.epochs": 2,
    "train.batch_size": 64,
    "eval.max_samples": "null",
    "strategies": "[frozen]",
}


def test_one_stage_each_users_last_interaction_is_the_test(
    sunny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="evolora.data"):
        prepared = prepare_data(tiny_config(sunny_dir, tmp_path, **SINGLE))
    assert "staging single (count, 1 stage):" in caplog.text  # the scheme the user chose, not lsat's name
    assert list(prepared.pools) == [1]
    df = prepared.table.df
    assert set(df["stage"].unique().to_list()) == {1}  # every interaction with a history is a sample
    pool = prepared.pools[1]
    users, ts = df["user_id"].to_numpy(), df["timestamp"].to_numpy()
    assert len(np.unique(users[pool.test])) == len(pool.test) == len(np.unique(users))
    for kind, back in (("test", 1), ("valid", 2)):
        for r in getattr(pool, kind):
            later = np.flatnonzero((users == users[r]) & (np.arange(len(users)) > r))
            assert len(later) == back - 1, kind  # the user's last (test) or second-to-last (valid) sample
    assert ts[pool.train].max() <= ts[pool.test].max()
    assert len(pool.train) + len(pool.valid) + len(pool.test) == df.height


def test_a_single_split_run_and_its_report(sunny_dir: Path, tmp_path: Path) -> None:
    (res,) = run_experiment(tiny_config(sunny_dir, tmp_path, **SINGLE))
    assert res["complete"] and [(s["train_stage"], s["eval_stage"]) for s in res["stages"]] == [(1, 1)]
    assert res["stages"][0]["n_eval"] == res["stages"][0]["n_eval_total"]  # every user's last interaction
    text, _ = build_report([tmp_path])
    assert "| gru4rec-frozen |" in text and "leave D1 out" not in text


def test_run_shows_only_the_metrics_a_ranker_records(sunny_dir: Path, tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from evolora.cli import app
    from evolora.config import config_to_dict

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(tiny_config(sunny_dir, tmp_path / "runs", **SINGLE))))
    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 0, result.output
    assert "ndcg@10" in result.output and "nll" not in result.output  # a conventional model has no nll


def test_single_split_needs_leave_last_out_and_no_stage_count(sunny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="protocol: leave_last_out"):
        load_config(None, [f"data.source={sunny_dir}", "staging.scheme=single", "protocol=next_stage"])
    with pytest.raises(ConfigError, match=r"drop staging\.n_stages"):
        load_config(None, [f"data.source={sunny_dir}", "staging.scheme=single", "staging.n_stages=3"])
