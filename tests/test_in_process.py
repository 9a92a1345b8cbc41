"""The library used over and over in one process (a notebook, a service): what a run leaves behind.

Each case was found in an audit: a run's `threads` changed the next run's numbers, a run re-seeded the
caller's torch RNG, two experiments from two threads gave wrong figures silently, a `Recommender` asked from
two threads scored one query against another's table, a data file replaced by one of the same size and
mtime passed the "data changed" check within the process, and once-per-process warnings were missing from
later runs' log.txt.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest
import torch

import evolora
from evolora.data.digest import file_sha256
from evolora.errors import ConfigError
from evolora.experiment import run_experiment
from tests.helpers import tiny_config

SMALL = {"train.samples_per_stage": 16, "train.valid_samples": 8, "train.epochs": 1, "eval.max_samples": 16}


def test_a_run_leaves_the_callers_threads_and_random_state(
    sunny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from evolora import allocator, experiment

    applied = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: applied.append(True))
    monkeypatch.setattr(experiment, "keep_freed_memory", lambda: applied.append(True))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(7)
        expected = torch.rand(3)
        torch.manual_seed(7)
        run_experiment(
            tiny_config(sunny_dir, tmp_path, **{**SMALL, "threads": 2, "strategies": "[finetune]"})
        )
        assert torch.get_num_threads() == 1
        assert torch.equal(torch.rand(3), expected)
    finally:
        torch.set_num_threads(before)
    assert applied == []  # the caller's allocator too (the commands, which own their process, change it)


def test_one_experiment_at_a_time_per_process(sunny_dir: Path, tmp_path: Path) -> None:
    started, finish = threading.Event(), threading.Event()

    def hold(results: dict) -> None:
        started.set()
        finish.wait(60)

    first = threading.Thread(
        target=run_experiment,
        args=(tiny_config(sunny_dir, tmp_path / "a", **{**SMALL, "strategies": "[finetune]"}),),
        kwargs={"on_stage": hold},
    )
    first.start()
    try:
        assert started.wait(120)
        with pytest.raises(ConfigError, match="another experiment or update runs in this process"):
            run_experiment(tiny_config(sunny_dir, tmp_path / "b", **SMALL))
    finally:
        finish.set()
        first.join()
    assert run_experiment(tiny_config(sunny_dir, tmp_path / "b", **SMALL))  # free again


def test_a_recommender_asked_from_several_threads_answers_each_query_as_alone(
    sunny_dir: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(sunny_dir, tmp_path, **{**SMALL, "strategies": "[finetune]"})
    run_experiment(cfg)
    rec = evolora.Recommender.load(Path(cfg.output_dir) / cfg.name, method="finetune")
    users = rec.known_users[:4]
    queries = {u: (["2", "3"] if i % 2 else ["2", "3", "4", "5", "6"]) for i, u in enumerate(users)}
    alone = {u: [s.score for s in rec.score(user=u, items=items)] for u, items in queries.items()}
    got: dict[str, list] = {u: [] for u in users}
    errors: list[BaseException] = []

    def ask(user: str) -> None:
        try:
            for _ in range(6):
                got[user].append([s.score for s in rec.score(user=user, items=queries[user])])
        except BaseException as e:  # an answer against another query's table raised, too
            errors.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, to find a race
    try:
        threads = [threading.Thread(target=ask, args=(u,)) for u in users]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    assert all(answer == alone[u] for u in users for answer in got[u])


def test_a_data_file_replaced_with_the_same_size_and_mtime_is_hashed_again(tmp_path: Path) -> None:
    """`cp -p`, `rsync -t` and `tar x` keep a file's mtime: keyed by (path, size, mtime) the in-process hash
    stayed the old file's, and continuing an experiment on other data passed within the process."""
    path = tmp_path / "log.csv"
    path.write_text("u,i,5\n")
    stat = path.stat()
    first = file_sha256(path)
    replacement = tmp_path / "other.csv"
    replacement.write_text("u,i,1\n")
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(replacement, path)
    assert path.stat().st_mtime_ns == stat.st_mtime_ns and path.stat().st_size == stat.st_size
    assert file_sha256(path) != first


def test_each_experiment_in_a_process_logs_its_own_warnings(sunny_dir: Path, tmp_path: Path) -> None:
    warned = "train.gradient_checkpointing applies to LLM backbones"
    for name in ("a", "b"):
        over = {**SMALL, "name": name, "model.name": "mf", "strategies": "[finetune]"}
        run_experiment(tiny_config(sunny_dir, tmp_path, **over, **{"train.gradient_checkpointing": "true"}))
        assert warned in (tmp_path / name / "log.txt").read_text(), name


def test_a_copy_missing_a_stages_files_says_to_rerun_the_experiment(sunny_dir: Path, tmp_path: Path) -> None:
    """`recommend` on a folder copied in part said "rerun the same command: stage 2 is redone" (a query
    redoes nothing), and, with the stage gone, "stage 2 has not finished (finished: [1, 2])"."""
    import shutil

    from evolora.experiment import run_dir_of

    cfg = tiny_config(sunny_dir, tmp_path, **{**SMALL, "strategies": "[finetune]"})
    run_experiment(cfg)
    root, stage = Path(cfg.output_dir) / cfg.name, run_dir_of(cfg, "finetune", 0) / "stage-2"
    shutil.rmtree(stage / "trained" / "adapters")
    with pytest.raises(evolora.errors.EvoloraError, match=r"rerun its experiment \(`evolora run`\)"):
        evolora.Recommender.load(root, method="finetune")
    shutil.rmtree(stage)
    with pytest.raises(
        ConfigError, match=r"stage 2's trained model is missing or incomplete .*`evolora run`"
    ):
        evolora.Recommender.load(root, method="finetune")
