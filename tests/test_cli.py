"""The command line: a whole run, the report, and user mistakes answered without a traceback."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml
from typer.testing import CliRunner

from evolora.cli import app
from evolora.config import load_config
from evolora.errors import ConfigError

runner = CliRunner()


def write_config(path: Path, data_dir: Path, out: Path, **extra) -> Path:
    cfg = {
        "name": "cli",
        "output_dir": str(out),
        "data": {"source": str(data_dir)},
        "staging": {"scheme": "lsat", "n_stages": 3},
        "task": {"history_len": 5, "template": "compact"},
        "model": {"name": "tiny", "precision": "fp32"},
        "train": {"samples_per_stage": 24, "valid_samples": 16, "epochs": 1, "lr": 0.01},
        "eval": {"max_samples": 24},
        "strategies": ["frozen", "finetune", "retrain"],
    }
    cfg.update(extra)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_prints_stage_table_and_report_compares(sunny_dir: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", sunny_dir, tmp_path / "runs")
    result = runner.invoke(app, ["run", str(config), "--set", "train.epochs=1"])
    assert result.exit_code == 0, result.output
    assert "per-stage results" in result.output
    # the whole time, as report.md's cost section adds it up (the table's `train s` is training alone)
    span = r"([\d.]+) (s|min|h)"
    said = rf"^CPU time these runs took: {span} \({span} in stages, {span} setting up.*$"
    whole = re.search(said, result.output, re.M)
    assert whole, result.output
    total, in_stages, setting_up = (
        float(whole[i]) * {"s": 1, "min": 60, "h": 3600}[whole[i + 1]] for i in (1, 3, 5)
    )
    # each part rounded to a second (under a minute) or a tenth of a minute
    assert 0 <= total == pytest.approx(in_stages + setting_up, abs=7)
    assert whole[0] in (tmp_path / "runs/cli/report.md").read_text()  # the same sentence
    for method in ("frozen", "finetune", "retrain"):
        assert method in result.output
        res = json.loads((tmp_path / "runs" / "cli" / method / "seed0" / "results.json").read_text())
        assert res["method"] == method and len(res["stages"]) == 2
    root = tmp_path / "runs" / "cli"
    assert (root / "report.md").is_file() and (root / "report.json").is_file()
    assert (root / "auc.png").stat().st_size > 1000

    out = tmp_path / "rep"
    result = runner.invoke(app, ["report", str(root / "frozen"), str(root / "finetune"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    assert "| frozen |" in text and "| finetune |" in text and "vs finetune" in text
    assert "| D2 | D3 | mean |" in text.replace("seeds | ", "")
    assert (out / "auc.png").is_file()


def test_a_run_whose_training_diverged_says_so_under_its_table(sunny_dir: Path, tmp_path: Path) -> None:
    """Every epoch's loss NaN: the starting weights are kept, so the figures look like an untrained model's;
    the end of the run names such jobs instead of leaving them to a log line per epoch."""
    config = write_config(tmp_path / "c.yaml", sunny_dir, tmp_path / "runs", strategies=["finetune"])
    result = runner.invoke(app, ["run", str(config), "--set", "train.lr=1e30"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "diverged (the loss was not finite in every epoch" in text, result.output
    assert "finetune seed 0 stage 1 (default), finetune seed 0 stage 2 (default)" in text
    report = (tmp_path / "runs" / "cli" / "report.md").read_text()
    assert "**Diverged training**" in report and "finetune seed 0 stage 2 (default)" in report
    result = runner.invoke(app, ["run", str(config), "--overwrite"])  # a sane lr: nothing said
    assert result.exit_code == 0 and "diverged" not in result.output, result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.epoch=3"], "train.epoch: unknown key (did you mean 'epochs'?); train takes: "),
        (
            ["--set", "task.nosuch=3"],
            "task.nosuch: unknown key (check the spelling; README.md's Configuration",
        ),
        (["--set", "name=mlartifacts"], "name: 'mlartifacts' is where MLflow keeps every experiment's logs"),
        (["--set", "train.lr=-1"], "train.lr: Input should be greater than 0"),
        (["--set", "strategies=[nope]"], "unknown strategy 'nope'"),
        (["--set", "strategies=[{name: lsat, grid: []}]"], "grid: List should have at least 1 item"),
        (
            ["--set", "strategies=[{name: lsat, grid: [-3.0, 0.5]}]"],
            "grid.0: Input should be greater than or",
        ),
        (
            ["--set", "strategies=[{name: peso, lamda: 2}]"],
            "lamda: unknown option (did you mean 'lam'?); peso's options: lam,",
        ),
        (["--set", "strategies=[{name: peso, xyz: 2}]"], "xyz: unknown option (check the spelling); peso's"),
        # a nested group's own keys (they were the strategy's), and a validator's words without pydantic's
        (
            ["--set", "strategies=[{name: reclora, crm: {dimm: 8}}]"],
            "crm.dimm: unknown option (did you mean 'dim'?); reclora's crm options: ",
        ),
        (["--set", "strategies=[{name: reclora, crm: {mlp: [0]}}]"], "crm.mlp: give at least one positive"),
        # true where a number is wanted: refused as in the config (lam: true ran with lam 1)
        (["--set", "strategies=[{name: peso, lam: true}]"], "lam: a number, not true/false"),
        (["--set", "strategies=[{name: inflora, stats_samples: true}]"], "stats_samples: a number, not"),
        (["--set", "staging.n_stages=900"], "stage"),
        (["--set", "data.source=/no/such/folder"], "/no/such/folder"),
        (["--set", "model.lora.target_modules=[query]"], "not found in tiny"),
        (["--jobs", "0"], "--jobs 0"),
        (["--set", "name=..", "--overwrite"], "name: '..' is not a folder name"),
        (["--set", "name=_shared"], "name: '_shared' is not a folder name"),
        # a text YAML reads as a date, a number or true: told to quote it
        (
            ["--set", "name=2024-12-01"],
            "name: Input should be a valid string (YAML reads the value as a date: put",
        ),
        (
            ["--set", "name=yes"],
            '(YAML reads the value as true/false: put it in quotes, name: "..." or --set',
        ),
        (
            ["--set", "strategies=[{name: lsat, label: 2024}]"],
            "strategies.0.label: Input should be a valid string (YAML reads the value as a number: put it in "
            'quotes, "..." in its list)',
        ),
        (["--set", 'name="a\\nb"'], r"name: 'a\nb' is not a folder name"),  # a folder with a newline
        (["--set", "seeds=[0, 0]"], "seeds: each seed once"),
        (["--set", "seeds=[]"], "  seeds: give at least one (given by --set seeds=[])"),  # not "(top level)"
        (["--set", "seeds=[-1]"], "seeds.0: Input should be greater than or equal to 0"),
        (["--set", "eval.seed=-1"], "eval.seed: Input should be greater than or equal to 0"),
        (["--set", "data.like_threshold=nan"], "data.like_threshold: Input should be a finite number"),
        (["--set", "data.like_threshold=9"], "every sample is a dislike (rating > data.like_threshold 9"),
        (["--set", "strategies=[{name: finetune, label: a/b}]"], "strategies.0.label: 'a/b' is not a folder"),
        (["--set", "strategies=[{name: finetune, label: a|b}]"], "strategies.0.label: 'a|b': a label cannot"),
    ],
)
def test_user_mistakes_are_one_line_errors(
    sunny_dir: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    config = write_config(tmp_path / "c.yaml", sunny_dir, tmp_path / "runs")
    result = runner.invoke(app, ["run", str(config), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert "\n\n" not in result.output  # off a terminal no progress area leaves a blank line


def test_overwrite_deletes_only_an_experiment_folder(sunny_dir: Path, tmp_path: Path) -> None:
    """`name` is a folder under output_dir: one that is not an experiment's is neither deleted by
    --overwrite nor written among by a plain run. A config.yaml in it is no sign of an experiment (it was:
    --overwrite deleted a project folder holding one, and a plain run replaced its files)."""
    folder = tmp_path / "runs" / "cli"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    (folder / "config.yaml").write_text("name: mine\n")
    config = write_config(tmp_path / "c.yaml", sunny_dir, tmp_path / "runs", strategies=["frozen"])
    for flags, fate in ((["--overwrite"], "so it is not deleted"), ([], "a run would write its files among")):
        result = runner.invoke(app, ["run", str(config), *flags])
        assert result.exit_code == 2, result.output
        said = " ".join(result.output.split())
        assert "not an experiment folder (no experiment.json; it holds config.yaml, notes.txt)" in said, said
        assert fate in said
        assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "notes.txt"]
        assert (folder / "config.yaml").read_text() == "name: mine\n"
    # An empty folder, or one holding only what killed writes left and placeholders, is an experiment's
    (folder / "notes.txt").unlink()
    (folder / "config.yaml").unlink()
    (folder / ".bundle.x1.tmp").mkdir()
    (folder / ".gitkeep").write_text("")
    assert runner.invoke(app, ["run", str(config)]).exit_code == 0
    assert (folder / "experiment.json").is_file() and not (folder / ".bundle.x1.tmp").exists()
    # An experiment whose experiment.json was deleted, as a damaged one's error advises, is continued
    (folder / "experiment.json").unlink()
    again = runner.invoke(app, ["run", str(config)])
    assert again.exit_code == 0 and (folder / "experiment.json").is_file(), again.output


def test_an_overwrite_killed_between_its_first_two_files_is_continued(
    sunny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the new experiment.json and before config.yaml: the rerun of the same command was
    refused for good ("not an experiment folder (no config.yaml)"), the old experiment hidden aside."""
    import evolora.experiment as experiment

    config = write_config(tmp_path / "c.yaml", sunny_dir, tmp_path / "runs", strategies=["frozen"])
    assert runner.invoke(app, ["run", str(config)]).exit_code == 0
    real_write = experiment.atomic_write_text

    def killed_at_config(path: Path, text: str) -> None:
        if Path(path).name == "config.yaml":
            raise KeyboardInterrupt  # as SIGKILL: nothing after it runs (below, not even the restore)
        real_write(path, text)

    with monkeypatch.context() as patch:
        patch.setattr(experiment, "atomic_write_text", killed_at_config)
        patch.setattr(experiment, "_restore_if_untrained", lambda *args: None)
        args = ["run", str(config), "--overwrite", "--set", "train.lr=0.02"]
        assert runner.invoke(app, args).exit_code == 130
    root, aside = tmp_path / "runs" / "cli", tmp_path / "runs" / ".cli.replaced"
    assert sorted(p.name for p in root.iterdir()) == ["experiment.json"] and aside.is_dir()
    rerun = runner.invoke(app, args)
    assert rerun.exit_code == 0, rerun.output
    assert not aside.exists() and (root / "config.yaml").is_file() and (root / "frozen").is_dir()


def test_overwrite_with_settings_that_fail_keeps_the_experiment(sunny_dir: Path, tmp_path: Path) -> None:
    """--overwrite replaces the experiment only once the new settings work: a misspelt setting that fails
    before any stage is trained leaves the finished experiment as it was (it was deleted first)."""
    config = write_config(tmp_path / "c.yaml", sunny_dir, tmp_path / "runs", strategies=["frozen"])
    assert runner.invoke(app, ["run", str(config)]).exit_code == 0
    root = tmp_path / "runs" / "cli"
    before = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    result = runner.invoke(app, ["run", str(config), "--overwrite", "--set", "model.name=tinyy"])
    assert result.exit_code == 2, result.output
    assert sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file()) == before
    assert not (tmp_path / "runs" / ".cli.replaced").exists()
    # An --overwrite killed before its first stage left the experiment aside and its attempt in place: a
    # retry that fails too still puts the experiment back, and a report over output_dir reads it once.
    aside = tmp_path / "runs" / ".cli.replaced"
    root.rename(aside)
    root.mkdir()
    (root / "experiment.json").write_text('{"context_key": "other"}')  # an attempt writes it first
    (root / "config.yaml").write_text("name: cli\n")
    result = runner.invoke(app, ["run", str(config), "--overwrite", "--set", "model.name=tinyy"])
    assert result.exit_code == 2, result.output
    assert (
        sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file()) == before and not aside.exists()
    )
    root.rename(aside)
    root.mkdir()
    report = runner.invoke(app, ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")])
    assert report.exit_code == 2 and "no results.json" in report.output, report.output  # not the aside one
    root.rmdir()
    aside.rename(root)
    result = runner.invoke(app, ["run", str(config), "--overwrite", "--set", "strategies=[finetune]"])
    assert result.exit_code == 0, result.output
    assert not (root / "frozen").exists() and (root / "finetune").is_dir()
    assert not (tmp_path / "runs" / ".cli.replaced").exists()
    # an experiment name that is a file: one line, with or without --overwrite
    (tmp_path / "runs" / "afile").write_text("mine")
    for extra in ([], ["--overwrite"]):
        result = runner.invoke(app, ["run", str(config), "--set", "name=afile", *extra])
        assert result.exit_code == 2 and "is a file, not an experiment folder" in result.output, result.output
    assert (tmp_path / "runs" / "afile").read_text() == "mine"


def test_tables_off_a_terminal_are_not_cut_to_80_columns(
    sunny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rich.console import Console

    import evolora.cli as cli

    monkeypatch.delenv("COLUMNS", raising=False)
    assert cli.stdout_width() == 1000  # pytest's stdout is no terminal
    monkeypatch.setattr(cli, "console", Console(soft_wrap=True, width=cli.stdout_width()))
    config = write_config(
        tmp_path / "c.yaml", sunny_dir, tmp_path / "runs", strategies=["frozen"],
        staging={"scheme": "lsat", "n_stages": 7},
    )  # fmt: skip
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 0 and "…" not in result.output, result.output
    monkeypatch.setenv("COLUMNS", "120")
    assert cli.stdout_width() is None


def test_report_refuses_runs_that_are_not_the_same_setting_or_rows(
    sunny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Experiments of one setting report together (their runs are a method's seeds); a method run with
    other settings, or methods scored on other rows, are refused naming the difference (they were
    averaged as seeds, or tabled side by side)."""
    config = write_config(tmp_path / "c.yaml", sunny_dir, tmp_path / "runs", strategies=["frozen"])
    for name, sets in [
        ("a", []),
        # the same data spelt another way: not another setting (its digest says it is the same)
        ("b", ["--set", "seeds=[1]", "--set", f"data.source={sunny_dir}/../{sunny_dir.name}"]),
        ("c", ["--set", "seeds=[2]", "--set", "train.lr=0.05"]),
        ("d", ["--set", "strategies=[{name: frozen, label: other}]", "--set", "eval.max_samples=12"]),
    ]:
        result = runner.invoke(app, ["run", str(config), "--set", f"name={name}", *sets])
        assert result.exit_code == 0, result.output
    runs = tmp_path / "runs"
    together = runner.invoke(app, ["report", str(runs / "a"), str(runs / "b"), "--out", str(tmp_path / "r")])
    assert together.exit_code == 0, together.output
    frozen = json.loads((tmp_path / "r" / "report.json").read_text())["metrics"]["auc"]["methods"]["frozen"]
    assert frozen["seeds"] == [0, 1]  # the two experiments' runs are its seeds
    for other, message in [
        ("c", r"frozen ran with other settings in .*a and .*c \(train.lr: 0.01 -> 0.05\)"),
        ("d", r"D2 is evaluated on 24 of .* samples in .*a but 12 of"),
    ]:
        result = runner.invoke(
            app, ["report", str(runs / "a"), str(runs / other), "--out", str(tmp_path / "x")]
        )
        assert result.exit_code == 2 and re.search(message, result.output.replace("\n", "")), result.output
    # a run folder given by a short relative path (three parents up was ".", no experiment: not checked)
    monkeypatch.chdir(runs / "c" / "frozen")
    result = runner.invoke(app, ["report", "seed2", str(runs / "a"), "--out", str(tmp_path / "y")])
    said = result.output.replace("\n", "")
    assert result.exit_code == 2, result.output
    assert f"frozen ran with other settings in {runs / 'c'} and {runs / 'a'} (train.lr: 0.05 -> 0.01)" in said


def test_a_report_names_the_configured_runs_not_started(sunny_dir: Path, tmp_path: Path) -> None:
    """A run killed before a method or a seed started (no run.json): the report left it out without a word."""
    config = write_config(
        tmp_path / "c.yaml", sunny_dir, tmp_path / "runs", strategies=["frozen", "finetune"]
    )
    result = runner.invoke(app, ["run", str(config), "--set", "seeds=[0, 1]"])
    assert result.exit_code == 0, result.output
    root = tmp_path / "runs" / "cli"
    shutil.rmtree(root / "finetune" / "seed1")  # as if killed before it started
    result = runner.invoke(app, ["report", str(root), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r" / "report.md").read_text()
    assert "Not started yet (in the experiment's config, not in the tables): finetune seed 1." in text
    # a run of an evolora before run.json (2026-11-30) holds its results.json: started
    (root / "frozen" / "seed0" / "run.json").unlink()
    runner.invoke(app, ["report", str(root), "--out", str(tmp_path / "r")])
    assert "in the tables): finetune seed 1." in (tmp_path / "r" / "report.md").read_text()
    shutil.rmtree(root / "frozen")
    text = runner.invoke(app, ["report", str(root), "--out", str(tmp_path / "r")]).output
    assert (
        "Not started yet (in the experiment's config, not in the tables): frozen seeds 0, 1; finetune seed 1."
        in text.replace("\n", " ")
    )


def test_missing_config_and_bad_yaml(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2 and "config file not found" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain:\n  epochs: [1, 2\n  lr: 3\n")
    result = runner.invoke(app, ["run", str(bad)])
    said = (
        "bad.yaml: not valid YAML: line 4, column 5: expected ',' or ']', but got ':' (while parsing a flow "
        "sequence from line 3, column 11)"
    )  # one line: PyYAML's own spans six, with its carets and "<unicode string>"
    assert result.exit_code == 2 and said in result.output.replace("\n", ""), result.output
    assert "unicode string" not in result.output
    bad.write_text("name: x\ntrain: {epochs: 1}\nname: y\n")  # plain YAML keeps the last silently
    result = runner.invoke(app, ["run", str(bad)])
    assert result.exit_code == 2 and "'name' is given twice (lines 1 and 3)" in result.output, result.output
    bad.write_bytes(b"\xff\xfe name: x\n")
    result = runner.invoke(app, ["run", str(bad)])
    assert result.exit_code == 2 and "not UTF-8 text" in result.output and "Traceback" not in result.output
    # a --set value's parser error is one line naming the character, not the parser's four
    bad.write_text("train: {epochs: 1}")
    result = runner.invoke(app, ["run", str(bad), "--set", "train.lr=[1, 2"])
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0, result.output
    assert (
        "value is not valid YAML (expected ',' or ']', but got '<stream end>' at character 6)"
        in result.output
    )


def test_values_yaml_cannot_build_and_numbers_without_a_value_are_one_line_errors(tmp_path: Path) -> None:
    """An impossible date or a failed YAML tag raised a traceback (PyYAML's ValueError, not a YAMLError);
    lr=.inf passed gt=0 and trained nothing (every epoch NaN, the run 'finished')."""
    config = tmp_path / "c.yaml"
    config.write_text("train: {epochs: 1}")
    for value in ["staging.window=[2024-13-01, 2024-02-01]", "train.epochs=!!int abc", "train.lr=!!bool x"]:
        result = runner.invoke(app, ["run", str(config), "--set", value])
        assert result.exit_code == 2 and "value cannot be read" in result.output, result.output
        assert "Traceback" not in result.output
    dated = tmp_path / "d.yaml"
    dated.write_text("name: x\nstaging:\n  window: [2024-02-30, 2024-03-01]\n")
    for command in (["run", str(dated)], ["data", "info", str(dated)]):
        result = runner.invoke(app, command)
        assert (
            result.exit_code == 2
            and "a value cannot be read: ValueError: day is out of range" in result.output
        ), result.output
    for value, key in [
        ("train.lr=.inf", "train.lr"),
        ("update.min_gain=.nan", "update.min_gain"),
        ("strategies=[{name: peso, lam: .inf}]", "lam"),
    ]:
        result = runner.invoke(app, ["run", str(config), "--set", value])
        assert result.exit_code == 2 and key in result.output and "finite" in result.output, result.output
    result = runner.invoke(app, ["run", str(tmp_path)])
    assert result.exit_code == 2 and "is a folder; give a config file" in result.output


def test_a_negative_version_to_roll_back_to_is_read_as_a_number(tmp_path: Path) -> None:
    """`evolora rollback RUN -1` was refused as "No such option: -1", then in typer's usage box."""
    result = runner.invoke(app, ["rollback", str(tmp_path), "-1"])
    said = "error: version -1: versions are numbered from 0 (`evolora versions` lists them)\n"
    assert result.exit_code == 2 and result.output == said, result.output


def test_true_or_false_for_a_number_is_refused(tmp_path: Path) -> None:
    """pydantic's lax mode read `epochs: true` as 1 epoch and `seeds: [true]` as seed 1, silently; the
    flags and the settings that take true beside other values keep taking it."""
    for value, key in [
        ("train.epochs=true", "train.epochs"),
        ("seeds=[0, true]", "seeds"),
        ("threads=true", "threads"),
        ("train.samples_per_stage=[8, false]", "train.samples_per_stage"),
        ("model.lora.r=false", "model.lora.r"),
        ("train.lr=true", "train.lr"),
    ]:
        with pytest.raises(ConfigError, match=rf"{key}: a number, not true/false \(given by --set"):
            load_config(None, [value])
    flags = ["train.gradient_checkpointing=true", "task.name=next_item", "task.exclude_history=true"]
    assert load_config(None, flags).task.exclude_history is True


def test_settings_that_select_by_last_does_not_read_are_said(
    sunny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`select_by: last` skips validation, so patience and keep_start_if_better never acted: silently."""
    from evolora.experiment import run_experiment
    from tests.helpers import tiny_config

    over = {"train.select_by": "last", "train.patience": 1, "train.keep_start_if_better": "true"}
    cfg = tiny_config(sunny_dir, tmp_path, strategies="[finetune]", **{**over, "train.epochs": 1})
    with caplog.at_level("WARNING", logger="evolora"):
        run_experiment(cfg)
    said = "train.patience, train.keep_start_if_better: not read with train.select_by: last (no validation)"
    assert said in caplog.text


def test_a_model_folder_without_a_model_is_a_one_line_error(tmp_path: Path) -> None:
    from evolora.models.weights import load_pretrained

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"is a folder with no config\.json"):
        load_pretrained(str(tmp_path / "empty"), torch.float32)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="the folder's model or tokenizer cannot be loaded"):
        load_pretrained(str(tmp_path / "broken"), torch.float32)


def test_report_without_results_is_an_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "no results.json" in result.output
    assert "started" not in result.output
    # a run in its first stage (run.json, no results.json yet) is named as such
    (tmp_path / "x" / "finetune" / "seed0").mkdir(parents=True)
    (tmp_path / "x" / "finetune" / "seed0" / "run.json").write_text("{}")
    result = runner.invoke(app, ["report", str(tmp_path / "x")])
    assert result.exit_code == 2, result.output
    assert f"started, no stage finished yet: {tmp_path / 'x' / 'finetune' / 'seed0'}" in result.output
    (tmp_path / "notes.md").write_text("mine")
    result = runner.invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "notes.md")])
    assert result.exit_code == 2 and "is a file; give a folder" in result.output


def test_an_output_folder_that_cannot_be_made_is_one_line(sunny_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("mine")
    config = write_config(tmp_path / "c.yaml", sunny_dir, tmp_path / "runs")
    for output_dir, message in [("notes.md", "a file is there"), ("notes.md/runs", "cannot be created")]:
        result = runner.invoke(app, ["run", str(config), "--set", f"output_dir={tmp_path / output_dir}"])
        assert result.exit_code == 2 and f"output_dir {tmp_path / output_dir}: " in result.output
        assert message in result.output and "Traceback" not in result.output, result.output
    # /proc takes no new folder even where its modes say so (as root): the export's folder is probed
    result = runner.invoke(app, ["export", str(tmp_path / "runs"), "--out", "/proc/evolora-export"])
    assert result.exit_code == 2 and "of the export /proc: " in result.output, result.output
    assert "nothing can be written there" in result.output or "cannot write there" in result.output


def test_a_narrow_beam_search_is_refused_with_the_config(sunny_dir: Path, tmp_path: Path) -> None:
    """Hit@10 needs 10 beams: said before the data is staged and the semantic IDs trained, not after."""
    config = write_config(tmp_path / "c.yaml", sunny_dir, tmp_path / "runs")
    sets = ["task.name=next_item", "task.template=peso", "task.beams=5", "protocol=leave_last_out"]
    result = runner.invoke(app, ["run", str(config), *[a for s in sets for a in ("--set", s)]])
    assert result.exit_code == 2 and "task.beams" in result.output, result.output
    assert "greater than or equal to 10" in result.output and not (tmp_path / "runs").exists()


def test_excluding_the_history_under_levelwise_decoding_is_refused(sunny_dir: Path, tmp_path: Path) -> None:
    """levelwise decoding returned the excluded items (it skipped the exclusion), while the run's prompt
    recipe said they were left out."""
    config = write_config(tmp_path / "c.yaml", sunny_dir, tmp_path / "runs")
    sets = [
        "task.name=next_item",
        "task.template=peso",
        "task.constraint=levelwise",
        "task.exclude_history=true",
    ]
    result = runner.invoke(app, ["run", str(config), *[a for s in sets for a in ("--set", s)]])
    assert result.exit_code == 2 and "task.exclude_history" in result.output, result.output
    assert "needs task.constraint: trie" in result.output and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("value", ["ratd", "all"])
def test_an_unknown_exclude_history_names_the_three_values(
    value: str, sunny_dir: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "c.yaml", sunny_dir, tmp_path / "runs")
    sets = ["task.name=next_item", "task.template=peso", f"task.exclude_history={value}"]
    result = runner.invoke(app, ["run", str(config), *[a for s in sets for a in ("--set", s)]])
    assert result.exit_code == 2, result.output
    said = f"give true (the prompt's items), rated (every item rated before) or false: '{value}'"
    assert said in result.output
    assert "literal" not in result.output and not (tmp_path / "runs").exists()


def test_a_negative_gradient_clip_is_refused(sunny_dir: Path, tmp_path: Path) -> None:
    """clip_grad_norm_ with a negative norm flips every gradient: refused, where 0 (no clipping) is fine."""
    config = write_config(tmp_path / "c.yaml", sunny_dir, tmp_path / "runs")
    result = runner.invoke(app, ["run", str(config), "--set", "train.max_grad_norm=-1"])
    assert result.exit_code == 2 and "train.max_grad_norm" in result.output, result.output
    assert "greater than or equal to 0" in result.output and not (tmp_path / "runs").exists()


def test_data_info_shows_stages(sunny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    monkeypatch.setattr("evolora.cli.console", Console(width=200))
    result = runner.invoke(app, ["data", "info", str(sunny_dir), "--set", "staging.n_stages=3"])
    assert result.exit_code == 0, result.output
    assert "interactions" in result.output and "new users" in result.output
    assert "1997-" in result.output or "1998-" in result.output
    # The per-stage share of liked ratings, computed here from the same fixture for the three stages.
    from evolora.config import load_config
    from evolora.data import assign_stages, load_dataset
    from evolora.experiment import resolve_config

    cfg = resolve_config(load_config(None, [f"data.source={sunny_dir}", "staging.n_stages=3"]))
    data = load_dataset(cfg.data)
    staged = assign_stages(data.interactions, cfg.staging).filter(pl.col("stage") > 0)
    shares = staged.group_by("stage").agg((pl.col("rating") > data.like_threshold).mean()).sort("stage")
    assert "liked" in result.output
    for share in shares["rating"]:
        assert f"{share:.4f}" in result.output


def test_data_info_shows_single_and_times_where_stages_share_a_day(
    sunny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`single` was refused for the protocol data info never uses; a boundary inside one day showed the
    same date on both sides, which read as an overlap."""
    from rich.console import Console

    monkeypatch.setattr("evolora.cli.console", Console(width=200))
    single = runner.invoke(app, ["data", "info", str(sunny_dir), "--set", "staging.scheme=single"])
    assert single.exit_code == 0 and "stages (single, 1)" in single.output, single.output
    tied = tmp_path / "one-day.csv"
    rows = ["u,i,t,r"] + [
        f"u{k % 5},i{k % 7},2024-03-01T{k // 60:02d}:{k % 60:02d}:00,{1 + k % 5}" for k in range(120)
    ]
    tied.write_text("\n".join(rows) + "\n")
    columns = "data.columns={user: u, item: i, time: t, rating: r}"
    args = ["data", "info", str(tied), "--format", "table", "--set", columns, "--set", "staging.n_stages=3"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2024-03-01 00:39:00" in result.output and "2024-03-01 00:40:00" in result.output


def test_data_commands_show_progress_bars(
    sunny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A download or a large log takes a while: `data fetch` and `data info` show their bars."""
    from evolora import progress

    seen = []

    def fake_fetch(name: str, force: bool = False) -> Path:
        seen.append(progress._active is not None)
        return tmp_path

    monkeypatch.setattr("evolora.data.fetch", fake_fetch)
    assert runner.invoke(app, ["data", "fetch", "ml-100k"]).exit_code == 0
    import evolora.data as data_module

    load = data_module.load_dataset

    def watched_load(*args, **kwargs):
        seen.append(progress._active is not None)
        return load(*args, **kwargs)

    monkeypatch.setattr(data_module, "load_dataset", watched_load)
    assert runner.invoke(app, ["data", "info", str(sunny_dir)]).exit_code == 0
    assert seen == [True, True]


def test_report_bootstrap_compares_on_the_same_rows(sunny_dir: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", sunny_dir, tmp_path / "runs")
    assert runner.invoke(app, ["run", str(config)]).exit_code == 0
    text = (tmp_path / "runs" / "cli" / "report.md").read_text()
    assert "Paired bootstrap" in text
    rows = [line for line in text.splitlines() if line.startswith("| frozen |") and "[" in line]
    assert rows, text
    lo, hi = (float(x) for x in rows[0].split("[")[1].split("]")[0].split(","))
    assert lo <= hi


def test_the_run_table_and_the_report_name_the_precision(sunny_dir: Path, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.yaml", sunny_dir, tmp_path / "runs", strategies=["frozen", "finetune"]
    )
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 0, result.output
    assert "precision: fp32 (every run); mean: D2 left out: shared within each experiment" in result.output
    text = (tmp_path / "runs" / "cli" / "report.md").read_text()
    assert "Precision: fp32 (every run)." in text and "leave D2 out" in text
    res = json.loads((tmp_path / "runs" / "cli" / "finetune" / "seed0" / "results.json").read_text())
    assert res["precision"] == "fp32"
    assert set(res["versions"]) == {"python", "torch", "transformers", "peft"}
    assert set(res["data_files"]["files"]) == {"u.data", "u.item"} and len(res["data_files"]["sha256"]) == 64
    # The mean in the table and the report skips the shared D2: it is the mean of D3 alone here.
    d3 = next(s for s in res["stages"] if s["eval_stage"] == 3)["metrics"]["auc"]
    row = next(line for line in text.splitlines() if line.startswith("| finetune |"))
    assert row.split("|")[-3].strip() == f"{d3:.4f}"


def test_a_bad_flag_value_is_reported_as_that_flag(sunny_dir: Path) -> None:
    result = runner.invoke(app, ["data", "info", str(sunny_dir), "--format", "csv"])
    assert result.exit_code == 2
    assert "data.format" in result.output and "(given by --format)" in result.output
    assert "defaults" not in result.output


def test_data_info_uses_the_stages_a_release_comes_with(tmp_path: Path) -> None:
    from tests.helpers import write_peso_cycle

    folder = write_peso_cycle(tmp_path / "cycle", n_blocks=3)
    result = runner.invoke(app, ["data", "info", str(folder)])
    assert result.exit_code == 0, result.output
    assert "stages (preset, 3)" in result.output


def test_run_without_a_config_runs_the_quickstart(monkeypatch: pytest.MonkeyPatch) -> None:
    """`make quickstart` is `evolora run` with no argument: the packaged quickstart config must be found."""
    from evolora import experiment
    from evolora.errors import EvoloraError

    seen = {}

    def instead(cfg, **kwargs):
        seen["cfg"] = cfg
        raise EvoloraError("stopped before any work")

    monkeypatch.setattr(experiment, "run_experiment", instead)
    result = runner.invoke(app, ["run"])
    assert "stopped before any work" in result.output, result.output
    assert seen["cfg"].name == yaml.safe_load(Path("configs/quickstart.yaml").read_text())["name"]


def test_a_label_reused_for_another_strategy_says_so_first(sunny_dir: Path, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.yaml", sunny_dir, tmp_path / "runs", strategies=[{"name": "peso", "label": "x"}]
    )
    assert runner.invoke(app, ["run", str(config)]).exit_code == 0
    result = runner.invoke(app, ["run", str(config), "--set", "strategies=[{name: finetune, label: x}]"])
    assert result.exit_code == 2, result.output
    assert "with other options (strategy: 'peso' -> 'finetune'; lam:" in result.output.replace("\n", ""), (
        result.output
    )
    # a cumulative strategy refused before its set-up: the refusal, not an AttributeError from tearing down
    sumlora = ["run", str(config), "--set", "name=cum", "--set", "strategies=[sumlora]"]
    assert runner.invoke(app, sumlora).exit_code == 0
    result = runner.invoke(app, [*sumlora, "--set", "strategies.sumlora.past=latest"])
    assert result.exit_code == 2 and "was run as 'sumlora' with other options" in result.output, result.output


def test_a_run_recorded_before_a_default_changed_is_not_continued_under_the_new_one(
    sunny_dir: Path, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "c.yaml", sunny_dir, tmp_path / "runs", strategies=[{"name": "olora", "label": "o"}]
    )
    assert runner.invoke(app, ["run", str(config)]).exit_code == 0
    marker = next((tmp_path / "runs").rglob("run.json"))
    assert json.loads(marker.read_text())["options"]["init"] == "fresh"  # every option is recorded
    marker.write_text(json.dumps({"strategy": "olora", "options": {}}))  # only the options given
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 2, result.output
    assert "init: 'inherit' -> 'fresh'" in result.output.replace("\n", ""), result.output
    pinned = ["run", str(config), "--set", "strategies=[{name: olora, label: o, init: inherit}]"]
    assert runner.invoke(app, pinned).exit_code == 0
    # LSAT's runs recorded fusion: delta, its default then; it does not apply to an ensemble, which carries on
    ensemble = ["run", str(config), "--set", "name=en", "--set", "strategies=[{name: lsat, long_stages: 1}]"]
    assert runner.invoke(app, ensemble).exit_code == 0
    marker = next((tmp_path / "runs" / "en").rglob("run.json"))
    recorded = json.loads(marker.read_text())
    assert recorded["options"]["fusion"] == "factors"
    recorded["options"]["fusion"] = "delta"  # as a run recorded it before 2026-12-04
    marker.write_text(json.dumps(recorded))
    result = runner.invoke(app, ensemble)
    assert result.exit_code == 0, result.output
    fused = [*ensemble[:-1], "strategies=[{name: lsat, label: ta, long_stages: 1, inference: fusion}]"]
    assert runner.invoke(app, fused).exit_code == 0
    marker = next((tmp_path / "runs" / "en" / "ta").rglob("run.json"))
    marker.write_text(json.dumps({"strategy": "lsat", "options": {"long_stages": 1, "inference": "fusion"}}))
    assert "fusion: 'delta' -> 'factors'" in runner.invoke(app, fused).output.replace("\n", "")
    # ... and what serves, exports or updates such a run rebuilds it as it ran: with the former default
    from evolora.experiment import restore_run

    strategy, _, _ = restore_run(marker.parent)
    try:
        assert strategy.options.fusion == "delta"
    finally:
        strategy.teardown()
    # SD-LoRA's runs from before `normalize` existed recorded every other option: they ran with `factors`
    sd = ["run", str(config), "--set", "name=sd", "--set", "strategies=[sdlora]"]
    assert runner.invoke(app, sd).exit_code == 0
    marker = next((tmp_path / "runs" / "sd").rglob("run.json"))
    recorded = json.loads(marker.read_text())
    del recorded["options"]["normalize"]
    marker.write_text(json.dumps(recorded))
    assert "normalize: 'factors' -> 'product'" in runner.invoke(app, sd).output.replace("\n", "")
    strategy, _, _ = restore_run(marker.parent)
    try:
        assert strategy.options.normalize == "factors" and strategy.past_normalization() == "factors"
    finally:
        strategy.teardown()
    # and a report does not average it with a run given the same options today as seeds of one setting
    again = ["run", str(config), "--set", "name=ta2", "--set", "seeds=[1]", "--set", fused[-1]]
    assert runner.invoke(app, again).exit_code == 0
    runs = tmp_path / "runs"
    result = runner.invoke(
        app, ["report", str(runs / "en" / "ta"), str(runs / "ta2"), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2, result.output
    assert "fusion: 'delta' -> 'factors'" in result.output.replace("\n", ""), result.output


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        (
            "scripts/catalogue_stages.py",
            ["ml-100k", "--out", "x.txt", "--stage", "a", "--stage", "b"],
            ".csv",
        ),
        ("scripts/catalogue_stages.py", ["ml-100k", "--out", "x.csv", "--stage", "Drama"], "at least two"),
        (
            "scripts/catalogue_stages.py",
            ["ml-100k", "--out", "x.csv", "--stage", "Drama", "--stage", " , "],
            "--stage ' , ': give at least one genre",
        ),
        (
            "scripts/catalogue_stages.py",
            ["ml-100k", "--out", "x.csv", "--stage", "Drama", "--stage", "Drama,Comedy", "--stage", "Drama"],
            "the genres Drama are in two different stages' groups",
        ),
        (
            "scripts/catalogue_stages.py",
            ["nosuch", "--out", "x.csv", "--stage", "a", "--stage", "b"],
            "nosuch",
        ),
    ],
)
def test_scripts_refuse_bad_arguments_in_one_line(
    tmp_path: Path, script: str, args: list, message: str
) -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, str(repo / script), *args], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_data_to_csv_writes_a_table_that_reads_back_as_the_source(sunny_dir: Path, tmp_path: Path) -> None:
    """`evolora data to-csv` (the deploy walk-through's first step, which installed users could not take: it
    was a script of the repository's): the files it writes, read with the settings it prints, are the
    source's rows, the latest share apart as a batch; a rerun keeps them, other contents are refused."""
    from evolora.config import DataConfig
    from evolora.data import load_dataset

    out = tmp_path / "csv"
    result = runner.invoke(app, ["data", "to-csv", str(sunny_dir), str(out), "--new-fraction", "0.25"])
    assert result.exit_code == 0, result.output
    settings = yaml.safe_load(result.output[result.output.index("data:") :])["data"]
    source = load_dataset(DataConfig(source=str(sunny_dir)))
    assert settings["like_threshold"] == source.like_threshold and settings["format"] == "table"
    run_part = load_dataset(DataConfig(**settings))
    batch = load_dataset(DataConfig(**{**settings, "source": str(out / "new-interactions.csv")}))
    cut = source.interactions.height - round(source.interactions.height * 0.25)
    assert (
        run_part.interactions.height == cut and batch.interactions.height == source.interactions.height - cut
    )
    for part, rows in ((run_part, source.interactions[:cut]), (batch, source.interactions[cut:])):
        assert part.interactions.select(rows.columns).equals(rows)
    titles = dict(zip(source.items["item_id"], source.items["title"], strict=True))
    assert (
        dict(zip(run_part.items["item_id"], run_part.items["title"], strict=True)).items() <= titles.items()
    )
    # A rerun (after a kill, say) keeps what is there; files of other rows are refused, nothing replaced.
    again = runner.invoke(app, ["data", "to-csv", str(sunny_dir), str(out), "--new-fraction", "0.25"])
    assert again.exit_code == 0 and again.output.count("(already there)") == 3, again.output
    before = (out / "interactions.csv").read_bytes()
    other = runner.invoke(app, ["data", "to-csv", str(sunny_dir), str(out), "--new-fraction", "0.5"])
    assert (
        other.exit_code == 2
        and "interactions.csv, new-interactions.csv there hold another table"
        in " ".join(other.output.split())
    ), other.output
    assert (out / "interactions.csv").read_bytes() == before
    replaced = ["data", "to-csv", str(sunny_dir), str(out), "--new-fraction", "0.5", "--overwrite"]
    assert runner.invoke(app, replaced).exit_code == 0 and (out / "interactions.csv").read_bytes() != before
    # Without a cut, a batch of an earlier one beside the files would be taken for this data's: refused,
    # or removed with --overwrite (which replaces the other files too).
    alone = runner.invoke(app, ["data", "to-csv", str(sunny_dir), str(out)])
    assert alone.exit_code == 2 and "a batch of an earlier cut is there" in alone.output, alone.output
    assert (out / "new-interactions.csv").is_file()
    whole = runner.invoke(app, ["data", "to-csv", str(sunny_dir), str(out), "--overwrite"])
    assert whole.exit_code == 0 and not (out / "new-interactions.csv").exists(), whole.output
    assert pl.read_csv(out / "interactions.csv").height == source.interactions.height


@pytest.mark.parametrize("share", ["1.5", "-0.1", "nan", "1e-17", "0.99999"])
def test_data_to_csv_refuses_a_share_in_one_line(sunny_dir: Path, tmp_path: Path, share: str) -> None:
    """A share outside [0, 1), or one so near 0 or 1 that a file would hold no row, is refused with nothing
    written (1e-17 passed the example script's check and wrote a header-only batch)."""
    result = runner.invoke(
        app, ["data", "to-csv", str(sunny_dir), str(tmp_path / "out"), "--new-fraction", share]
    )
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "\nerror:" in f"\n{result.output}" and "Traceback" not in said, said
    assert "kept apart, 0 <= f < 1" in said or "leaves no row in one of the two files" in said, said
    assert not (tmp_path / "out").exists()


def test_data_to_csv_refuses_a_source_without_dates(cycle_dir: Path, tmp_path: Path) -> None:
    """PESO's release orders its rows by made-up times in blocks: written as dates they would mislead."""
    result = runner.invoke(app, ["data", "to-csv", str(cycle_dir), str(tmp_path / "out")])
    assert result.exit_code == 2 and "its times only order the rows" in result.output, result.output


def test_the_stage_table_shows_an_undefined_metric_as_a_dash() -> None:
    from rich.console import Console

    from evolora.cli.tables import stage_table

    stages = [
        {"eval_stage": 2, "metrics": {"auc": 0.61}},
        {"eval_stage": 3, "metrics": {"auc": float("nan")}},
    ]
    results = [{"method": "finetune", "seed": 0, "stages": stages, "summary": {"train_seconds": 3.0}}]
    console = Console(width=120, record=True)
    console.print(stage_table(results, ("auc",)))
    text = console.export_text()
    assert "nan" not in text and "0.6100" in text and "–" in text, text


def test_titles_labels_and_paths_are_printed_as_written(tmp_path: Path) -> None:
    """Users' text is not rich markup: a title with "[director's cut]" kept it, ":stars:" stayed text and a
    "[/i]" in a title ended `evolora recommend` with a MarkupError."""
    from tests.helpers import EXAMPLE_DATA

    odd = ["Kit [director's cut]", "Kit :stars: edition", "Kit [/i] end", "[bold]Kit"]
    items = pl.read_csv(EXAMPLE_DATA / "example_items.csv")
    items = items.with_columns(pl.Series("name", [odd[i % len(odd)] for i in range(len(items))]))
    folder = tmp_path / "data [v2]"
    folder.mkdir()
    items.write_csv(folder / "items.csv")
    (folder / "log.csv").write_bytes((EXAMPLE_DATA / "example_log.csv").read_bytes())
    sets = {
        "name": "odd",
        "output_dir": str(tmp_path / "runs"),
        "data.source": str(folder / "log.csv"),
        "data.format": "table",
        "data.columns": "{user: uid, item: iid, time: ts, rating: stars, title: name}",
        "data.meta": str(folder / "items.csv"),
        "task.min_history": 1,
        "model.name": "mf",
        "strategies": "[{name: finetune, label: ':stars:[b]x'}]",
    }
    result = runner.invoke(app, ["run", *(f"--set={k}={v}" for k, v in sets.items())])
    assert result.exit_code == 0, result.output
    assert "│ :stars:[b]x │" in result.output
    every = ",".join(items["iid"])
    args = ["recommend", str(tmp_path / "runs" / "odd"), "--user", "user-01", "--items", every]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for title in odd:
        assert title in result.output, title
    result = runner.invoke(app, ["report", str(folder / "none :stars:")])
    assert result.exit_code == 2 and "data [v2]/none :stars:" in result.output, result.output


def test_progress_descriptions_are_shown_as_written() -> None:
    import io

    from rich.console import Console

    from evolora import progress

    out = io.StringIO()
    shown = Console(file=out, force_terminal=True, width=120)
    with progress.display(shown), progress.task("reading [/i] log :stars:.csv", total=2) as bar:
        bar.info("[red]x")
        bar.advance()
        progress._active.refresh()
    assert "reading [/i] log :stars:.csv" in out.getvalue() and "[red]x" in out.getvalue()


def test_a_bar_of_slow_steps_shows_the_time_remaining() -> None:
    """Steps over 30 s apart (an epoch of SmolLM2 on busy cores) left rich one sample in its speed window:
    no time remaining for the whole epoch."""
    import io

    from rich.console import Console

    from evolora import progress

    clock = [0.0]
    shown = Console(file=io.StringIO(), force_terminal=True, width=120, get_time=lambda: clock[0])
    with progress.display(shown), progress.task("training epoch 1/2", total=32) as bar:
        for _ in range(3):
            clock[0] += 45.0  # one step
            bar.advance()
        task = progress._active.tasks[0]
        assert task.time_remaining == pytest.approx(29 * 45.0)


def test_every_run_folder_of_other_options_is_named_before_anything_trains(
    sunny_dir: Path, tmp_path: Path
) -> None:
    """Runs recorded before two defaults changed: one refusal names both (it took a rerun each), and a
    strategy listed before them does not train first."""
    config = write_config(tmp_path / "c.yaml", sunny_dir, tmp_path / "runs", strategies=["olora", "sdlora"])
    assert runner.invoke(app, ["run", str(config)]).exit_code == 0
    for label, option in (("olora", "init"), ("sdlora", "normalize")):
        marker = tmp_path / "runs" / "cli" / label / "seed0" / "run.json"
        recorded = json.loads(marker.read_text())
        del recorded["options"][option]  # as recorded before the option's default changed
        marker.write_text(json.dumps(recorded))
    result = runner.invoke(
        app, ["run", str(config), "--set", "strategies=[{name: finetune, label: new}, olora, sdlora]"]
    )
    said = result.output.replace("\n", "")
    assert result.exit_code == 2, result.output
    assert "olora/seed0 (init: 'inherit' -> 'fresh'; ran as {name: olora, init: inherit})" in said, said
    assert (
        "sdlora/seed0 (normalize: 'factors' -> 'product'; ran as {name: sdlora, normalize: factors})" in said
    )
    assert not (tmp_path / "runs" / "cli" / "new").exists()
    swapped = runner.invoke(app, ["run", str(config), "--set", "strategies=[{name: frozen, label: olora}]"])
    said = swapped.output.replace("\n", "")
    assert "(strategy: 'olora' -> 'frozen'" in said and "pin" not in said, said  # nothing of its to pin


def test_a_label_naming_a_conventional_strategy_s_folder_is_refused() -> None:
    """din's `finetune` runs in the folder din-finetune: a strategy labelled so would share it."""
    clash = ["model.name=din", "strategies=[finetune, {name: frozen, label: din-finetune}]"]
    with pytest.raises(ConfigError, match=r"labels must be unique, repeated: \['din-finetune'\]"):
        load_config(None, clash)


def test_ctrl_c_offers_to_continue_only_what_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run or an update continues where it stopped; a query, a server, a report have nothing to continue."""
    from evolora import api, config

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(api.Recommender, "load", interrupted)
    monkeypatch.setattr(config, "load_config", interrupted)
    asked = CliRunner().invoke(app, ["recommend", str(tmp_path), "--user", "1", "--items", "2"])
    assert asked.exit_code == 130 and "interrupted" in asked.output and "continue" not in asked.output
    ran = CliRunner().invoke(app, ["run", str(tmp_path / "c.yaml")])
    assert ran.exit_code == 130 and "rerun the same command to continue" in ran.output


def test_ctrl_c_while_the_command_starts_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The first seconds of every command import torch and transformers, before the CLI's own Ctrl-C
    handling: a 20-36 line KeyboardInterrupt traceback there, exit -2. The `evolora` command and
    `python -m evolora` enter through `evolora.__main__`, which says it in one line."""
    import builtins
    import tomllib

    import evolora.__main__ as entry

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["evolora"] == "evolora.__main__:main"
    real_import = builtins.__import__

    def importing(name: str, *args: object, **kwargs: object) -> object:
        if name == "evolora.cli":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", importing)
    with pytest.raises(SystemExit) as stopped:
        entry.main()
    assert stopped.value.code == 130 and capsys.readouterr().err == "interrupted (nothing had started)\n"


def test_a_full_disk_is_one_line_and_the_rerun_continues(
    sunny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operating-system error (a full disk, a folder made read-only) ended in a 70-200 line traceback."""
    import errno

    from evolora import io

    config = write_config(tmp_path / "c.yaml", sunny_dir, tmp_path / "runs", strategies=["finetune"])
    real = io._write_bytes
    writes = {"results.json": 0}

    def full_after_the_first_stage(path: Path, data: bytes) -> None:
        if path.name == "results.json":
            writes["results.json"] += 1
            if writes["results.json"] > 1:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(io, "_write_bytes", full_after_the_first_stage)
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert re.search(
        r"error: \S+/results\.json: No space left on device; nothing finished is lost: rerun the same "
        r"command to continue",
        result.output,
    ), result.output
    monkeypatch.setattr(io, "_write_bytes", real)
    again = runner.invoke(app, ["run", str(config)])
    assert again.exit_code == 0, again.output
    res = json.loads((tmp_path / "runs" / "cli" / "finetune" / "seed0" / "results.json").read_text())
    assert len(res["stages"]) == 2


def test_a_write_that_fails_is_told_once_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flush failed, then closing flushed again: two chained tracebacks for one full disk."""
    import errno
    import os

    from evolora import io

    class FullDisk:
        """A buffered file on a full disk: writes are kept, every flush fails, closing flushes again."""

        def __init__(self, fd: int, mode: str) -> None:
            self.fd, self.pending, self.closed = fd, False, False

        def write(self, data: bytes) -> None:
            self.pending = True

        def flush(self) -> None:
            if self.pending:
                raise OSError(errno.ENOSPC, "No space left on device")

        def fileno(self) -> int:
            return self.fd

        def close(self) -> None:
            if not self.closed:
                self.closed = True
                os.close(self.fd)
                self.flush()

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.close()

    monkeypatch.setattr(os, "fdopen", FullDisk)
    with pytest.raises(OSError, match="No space left") as failed:
        io.atomic_write_bytes(tmp_path / "f.json", b"x" * (1 << 16))
    assert failed.value.__context__ is None
    assert list(tmp_path.iterdir()) == []


def test_overwrite_of_a_linked_experiment_folder(sunny_dir: Path, tmp_path: Path) -> None:
    """runs/cli links to a folder on another disk: --overwrite moved the link aside, trained, then failed
    ("Cannot call rmtree on a symbolic link") at the end of every later run. Now the folder it points to is
    replaced, and the link stays. A link to nothing is one line."""
    elsewhere = tmp_path / "disk" / "cli"
    elsewhere.mkdir(parents=True)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "cli").symlink_to(elsewhere)
    config = write_config(tmp_path / "c.yaml", sunny_dir, tmp_path / "runs", strategies=["frozen"])
    assert runner.invoke(app, ["run", str(config)]).exit_code == 0
    (elsewhere / "frozen" / "seed0" / "mine.txt").write_text("old")
    result = runner.invoke(app, ["run", str(config), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "cli").is_symlink() and (elsewhere / "report.md").is_file()
    assert not (elsewhere / "frozen" / "seed0" / "mine.txt").exists()
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["cli"]  # the old one deleted
    assert runner.invoke(app, ["run", str(config)]).exit_code == 0

    shutil.rmtree(elsewhere)
    dangling = runner.invoke(app, ["run", str(config)])
    assert (
        dangling.exit_code == 2
        and "links to" in dangling.output
        and "which does not exist" in dangling.output
    )


def test_off_a_terminal_long_work_is_told_in_log_lines(
    sunny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off a terminal (CI, nohup) the bars are off, and a long stage was silent until it ended; each bar
    still running after EVOLORA_PROGRESS_EVERY seconds is told as a line. Never on a terminal, never at 0."""
    config = write_config(tmp_path / "c.yaml", sunny_dir, tmp_path / "runs", strategies=["finetune"])
    monkeypatch.setenv("EVOLORA_PROGRESS_EVERY", "0.000001")
    told = runner.invoke(app, ["run", str(config)])
    assert told.exit_code == 0, told.output
    lines = re.findall(r"^INFO (.+): (\d+)/(\d+) \((\d+)%\), \d+m\d\ds so far", told.output, re.MULTILINE)
    assert lines and all(int(done) <= int(total) for _, done, total, _ in lines), told.output
    monkeypatch.setenv("EVOLORA_PROGRESS_EVERY", "0")
    quiet = runner.invoke(app, ["run", str(config), "--overwrite"])
    assert quiet.exit_code == 0 and " so far" not in quiet.output


def test_off_a_terminal_a_silent_log_is_told_whichever_bars_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The line came only when a bar advanced past its own minute: one step longer than that (a long first
    batch) was told after it ended, and a chain of shorter bars (statistics, then an epoch, then scoring)
    never, a minute and more of silence in CI logs. Now the log's silence is watched."""
    import io
    import logging
    import time

    from rich.console import Console

    from evolora import progress

    monkeypatch.setenv(progress.EVERY_ENV, "0.2")
    console = Console(file=io.StringIO(), force_terminal=False)
    with caplog.at_level(logging.INFO, logger="evolora"), progress.display(console):
        with progress.task("long step", 2) as bar:
            time.sleep(0.7)  # told while the step runs, before its bar moves
            bar.advance()
        for i in range(10):
            with progress.task(f"short {i}", 1) as bar:
                time.sleep(0.1)
                bar.advance()
        with progress.task("reading the data", None):  # a step without steps (data, a model's conversion)
            time.sleep(0.5)
    told = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("long step: 0/2 (0%), 0m00s so far") for line in told), told
    assert any(line.startswith("short ") for line in told), told
    assert "reading the data: 0m00s so far" in told, told
    assert not console.file.getvalue()  # (the log lines, not a live area)
    # A display inside another: one heartbeat, telling both one's bars at each silence (two took turns, each
    # resetting the other's clock); none left on the logger after.
    caplog.clear()
    with (
        caplog.at_level(logging.INFO, logger="evolora"),
        progress.display(console),
        progress.task("outer", 2),
        progress.display(console),
        progress.task("inner", 3),
    ):
        time.sleep(0.9)
    told = [r.getMessage().split(":")[0] for r in caplog.records]
    assert len(told) >= 4 and told == ["outer", "inner"] * (len(told) // 2), told
    assert not [h for h in logging.getLogger("evolora").handlers if isinstance(h, progress._Heartbeat)]


def test_quiet_shows_warnings_and_results_and_log_txt_keeps_everything(
    sunny_dir: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "c.yaml", sunny_dir, tmp_path / "runs", strategies=["finetune"])
    result = runner.invoke(app, ["run", str(config), "-q"])
    assert result.exit_code == 0, result.output
    assert "INFO" not in result.output and "WARNING" in result.output and "per-stage results" in result.output
    assert "INFO evolora: running finetune (seed 0)" in (tmp_path / "runs" / "cli" / "log.txt").read_text()
    both = runner.invoke(app, ["run", str(config), "-q", "-v"])
    assert both.exit_code == 2 and "not both" in both.output


def test_rerunning_a_moved_experiments_own_config_continues_it_where_it_lies(
    sunny_dir: Path, tmp_path: Path
) -> None:
    """config.yaml records the absolute output_dir: rerunning a moved copy's own config trained everything
    again at the old place, and left the copy as it was."""
    config = write_config(tmp_path / "c.yaml", sunny_dir, tmp_path / "runs", strategies=["frozen"])
    assert runner.invoke(app, ["run", str(config)]).exit_code == 0
    (tmp_path / "runs").rename(tmp_path / "moved")
    again = runner.invoke(app, ["run", str(tmp_path / "moved" / "cli" / "config.yaml")])
    assert again.exit_code == 0, again.output
    assert "continuing it where the config lies" in again.output
    assert not (tmp_path / "runs").exists()
    assert " epoch " not in again.output and "evaluated on stage" not in again.output  # nothing redone
    # Renamed too: it made the experiment again under its old name beside the renamed one
    (tmp_path / "moved" / "cli").rename(tmp_path / "moved" / "renamed")
    again = runner.invoke(app, ["run", str(tmp_path / "moved" / "renamed" / "config.yaml")])
    assert again.exit_code == 0 and "continuing it where the config lies" in again.output, again.output
    assert not (tmp_path / "moved" / "cli").exists()
    assert " epoch " not in again.output and "evaluated on stage" not in again.output
    # renamed to no experiment's name: said (it trained at the old place, silently)
    (tmp_path / "moved" / "renamed").rename(tmp_path / "moved" / "_old")
    refused = runner.invoke(app, ["run", str(tmp_path / "moved" / "_old" / "config.yaml")])
    assert refused.exit_code == 2 and "'_old' is no experiment name" in refused.output, refused.output
    assert not (tmp_path / "moved" / "renamed").exists()
