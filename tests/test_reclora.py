"""RecLoRA as a strategy: Few2Many CRM, per-sample routing, retrieval, resume and export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from evolora.errors import ConfigError
from evolora.experiment import run_dir_of, run_experiment
from evolora.io import load_state
from tests.helpers import tiny_config

CRM = "{dim: 8, mlp: [16], max_len: 10, dropout: 0.0}"
OVER = {
    "task.history_len": 4,
    "task.retrieve_from": 8,
    "task.sample_history": 10,
    "train.epochs": 1,
    "strategies": f"[{{name: reclora, n_meta: 3, crm: {CRM}, crm_epochs: 2}},"
    f" {{name: reclora, label: reclora-few, few2many: false, n_meta: 3, crm: {CRM}, crm_epochs: 2}}]",
}


def test_reclora_runs_stage_by_stage_with_its_crm(sunny_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(sunny_dir, tmp_path, **OVER)
    full, few = run_experiment(cfg)
    for res in (full, few):
        assert res["complete"] and len(res["stages"]) == 2
        for s in res["stages"]:
            info = s["strategy_info"]
            assert 0.0 <= s["metrics"]["auc"] <= 1.0
            assert info["crm_valid_auc"] is not None and info["crm_seconds"] > 0
    # Few2Many trains the CRM on the whole stage pool; the ablation only on the LLM's samples.
    assert (
        full["stages"][0]["strategy_info"]["crm_train_rows"]
        > few["stages"][0]["strategy_info"]["crm_train_rows"]
    )
    assert few["stages"][0]["strategy_info"]["crm_train_rows"] == few["stages"][0]["n_train"]
    # The adapter state of the run's first stage holds the banks and the CRM.
    state = load_state(run_dir_of(cfg, "reclora", 0) / "stage-1" / "trained" / "state.safetensors")
    assert "personal" in state["strategy"] and "crm" in state["strategy"]


def test_reclora_trains_new_banks_at_lr_and_continues_them_at_lr_inherit(
    sunny_dir: Path, tmp_path: Path
) -> None:
    over = {
        **OVER,
        "strategies": f"[{{name: reclora, n_meta: 3, crm: {CRM}, crm_epochs: 1}}]",
        "train.lr": 3e-3,
        "train.lr_inherit": 2e-4,
        "train.schedule": "constant",
    }
    (res,) = run_experiment(tiny_config(sunny_dir, tmp_path, **over))
    # The click model trains as a job of its own (model "crm"); the banks are the LLM's job.
    assert [[j["model"] for j in s["jobs"]] for s in res["stages"]] == [["crm", None]] * 2
    lrs = [s["jobs"][1]["history"][-1]["lr"] for s in res["stages"]]
    assert lrs == pytest.approx([3e-3, 2e-4])


def test_reclora_resumes_identically(sunny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from evolora.tasks.ctr import CtrTask

    over = {
        **OVER,
        "strategies": f"[{{name: reclora, n_meta: 3, crm: {CRM}, crm_epochs: 2}}]",
        "train.epochs": 2,
    }
    reference = run_experiment(tiny_config(sunny_dir, tmp_path / "ref", **over))[0]
    cfg = tiny_config(sunny_dir, tmp_path / "run", **over)
    real = CtrTask.loss
    calls = {"n": 0}

    def dying(self, lm, rows):
        calls["n"] += 1
        if calls["n"] == 9:  # inside stage 1's second epoch (6 batches per epoch)
            raise KeyboardInterrupt
        return real(self, lm, rows)

    monkeypatch.setattr(CtrTask, "loss", dying)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg)
    monkeypatch.setattr(CtrTask, "loss", real)
    resumed = run_experiment(cfg)[0]
    for a, b in zip(resumed["stages"], reference["stages"], strict=True):
        assert a["metrics"] == pytest.approx(b["metrics"], abs=1e-9)


def test_reclora_needs_a_long_enough_history_and_ctr(sunny_dir: Path, tmp_path: Path) -> None:
    """Refused before any work: listed after other strategies, the mistake came at reclora's set-up, after
    they had all run (minutes to hours)."""
    first = f"[finetune, {{name: reclora, n_meta: 3, crm: {CRM}, crm_epochs: 2}}]"
    bad = {**OVER, "task.sample_history": 4, "strategies": first}
    with pytest.raises(ConfigError, match=r"samples keep 8: set task\.sample_history: 10"):
        run_experiment(tiny_config(sunny_dir, tmp_path, **bad))
    assert not list(tmp_path.glob("**/finetune/seed0/stage-*"))
    with pytest.raises(ConfigError, match="reclora works on the ctr task"):
        next_item = {"task.name": "next_item", "task.template": "peso", "strategies": first}
        run_experiment(tiny_config(sunny_dir, tmp_path, **next_item))


def test_export_gives_the_user_adapter(sunny_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    from evolora.config import StrategySpec
    from evolora.continual import Env, build_strategy
    from evolora.experiment import build_model_and_task, prepare_data
    from evolora.models.weights import load_pretrained

    cfg = tiny_config(sunny_dir, tmp_path, **OVER)
    prepared = prepare_data(cfg)
    lm, task = build_model_and_task(cfg, prepared)
    spec = StrategySpec(name="reclora", n_meta=3, crm={"dim": 8, "mlp": [16], "max_len": 10})
    strategy = build_strategy(spec, Env(lm, task, cfg, prepared), seed=0)
    strategy.setup()
    strategy._represent()
    with torch.no_grad():
        for bank in strategy.personal.banks.values():
            bank.B.normal_(0, 0.1)
    row = int(prepared.pools[1].train[0])
    rows = np.array([row])
    lm.model.eval()
    expected = task.predict(lm, rows, 1)
    strategy.export_user_adapter(row, tmp_path / "user")
    # the base it names is the run's at its revision (PEFT's loaders read `revision`)
    strategy.personal.export(strategy.z[row], tmp_path / "pinned", revision="v1.0")
    pinned = json.loads((tmp_path / "pinned" / "adapter_config.json").read_text())
    assert pinned["base_model_name_or_path"] == "tiny" and pinned["revision"] == "v1.0"
    assert "revision" not in json.loads((tmp_path / "user" / "adapter_config.json").read_text())
    strategy.teardown()
    base, _ = load_pretrained("tiny", torch.float32)
    from evolora.models.llm import LoraLM

    user = PeftModel.from_pretrained(base, str(tmp_path / "user"))
    plain = LoraLM(user, lm.tokenizer, lm.device, None, lm.lora, "tiny")
    assert task.predict(plain, rows, 1) == pytest.approx(expected, abs=1e-5)


def test_a_finished_run_restores_and_exports_a_user_adapter_from_the_cli(
    sunny_dir: Path, tmp_path: Path
) -> None:
    import yaml
    from peft import PeftModel
    from typer.testing import CliRunner

    from evolora.cli import app
    from evolora.experiment import restore_run
    from evolora.models.llm import LoraLM
    from evolora.models.weights import load_pretrained

    over = {**OVER, "strategies": f"[{{name: reclora, n_meta: 3, crm: {CRM}, crm_epochs: 2}}]"}
    cfg = tiny_config(sunny_dir, tmp_path, **over)
    run_experiment(cfg)
    (tmp_path / "t" / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    run = run_dir_of(cfg, "reclora", 0)

    # The restored strategy scores the last stage's evaluation rows exactly as the run did.
    strategy, prepared, t = restore_run(run)
    assert t == 2
    with np.load(run / "stage-2" / "predictions.npz") as z:
        rows, saved = z["rows"], z["scores"]
    from evolora.continual.base import StageContext

    ctx = StageContext(t, 3, prepared.pools, 0, run / "stage-2", rows)
    assert strategy.predict(ctx, rows) == pytest.approx(saved, abs=1e-6)
    user = str(prepared.table.df["user_id"][int(rows[0])])
    row = strategy.export_for_user(user, tmp_path / "direct", until_stage=3)
    expected = strategy.predict(ctx, np.array([row]))
    strategy.teardown()

    result = CliRunner().invoke(app, ["export-user-adapter", str(run), user, "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    base, tok = load_pretrained("tiny", torch.float32)
    plain = PeftModel.from_pretrained(base, str(tmp_path / "cli"))
    lm = LoraLM(plain, tok, torch.device("cpu"), None, cfg.model.lora, "tiny")
    lm.separate_prefix_pass = False  # as RecLoRA scores, so both run the same arithmetic
    assert strategy.task.predict(lm, np.array([row]), 1) == pytest.approx(expected, abs=1e-5)

    refused = CliRunner().invoke(app, ["export-user-adapter", str(run), "no-such-user"])
    assert refused.exit_code == 2 and "no sample of user" in refused.output
    # The experiment folder works as for the other commands; an earlier adapter is replaced, and what a killed
    # export left beside it (a temporary copy) goes.
    (tmp_path / ".cli.k3j2h1g0.tmp").mkdir()
    again = CliRunner().invoke(
        app, ["export-user-adapter", str(run.parent.parent), user, "--out", str(tmp_path / "cli")]
    )
    assert again.exit_code == 0 and not (tmp_path / ".cli.k3j2h1g0.tmp").exists(), again.output
    refused = CliRunner().invoke(app, ["export-user-adapter", str(run), user, "--out", str(run)])
    assert refused.exit_code == 2 and "holds other files" in refused.output  # the run is not replaced
    assert (run / "results.json").is_file()
    # Deployed, with an update's version promoted: the default is the version served, whose adapter answers
    # a query (test_a_deployed_version_exports_...), so an item is asked for; --stage names the run's own.
    from evolora.deploy.versions import Version, Versions

    registry = Versions.open(tmp_path / "t", "reclora", 0, 2)
    registry.add(Version(1, 0, 3, "2026-12-05T00:00:00Z", "deploy/x/stage-3"), promote=True)
    refused = CliRunner().invoke(app, ["export-user-adapter", str(run), user])
    assert refused.exit_code == 2 and "version 1 (stage 3) answers a user and an item" in refused.output
    assert "pass --item (or --stage, up to 2," in refused.output, refused.output
    staged = ["export-user-adapter", str(run), user, "--stage", "2", "--out", str(tmp_path / "cli")]
    assert CliRunner().invoke(app, staged).exit_code == 0
    # the update's stage is no stage of the run's own: its version is named (it said the run never trained it)
    refused = CliRunner().invoke(app, ["export-user-adapter", str(run), user, "--stage", "3"])
    assert refused.exit_code == 2 and "stage 3 was trained by an update: give its version (--version 1" in (
        refused.output
    )
    # with `combine: products` there is no per-user LoRA either: `export` does not send the user there
    from types import SimpleNamespace

    from evolora.continual.reclora import RecLora
    from evolora.errors import EvoloraError

    with pytest.raises(EvoloraError, match="neither `export` nor `export-user-adapter`"):
        RecLora.plain_adapters(SimpleNamespace(o=SimpleNamespace(combine="products")))  # type: ignore[arg-type]


def test_a_partial_crm_setting_keeps_reclora_s_other_defaults() -> None:
    """`crm: {dim: 8}` changes the dimension only: dropout, history length and MLP stay RecLoRA's (0.1, 60,
    256-256-256 with ReLU), not the generic conventional defaults (0.2, 50, 128-64 with PReLU)."""
    from evolora.continual.reclora import RECLORA_CRM, RecLoraOptions

    crm = RecLoraOptions.model_validate({"crm": {"dim": 8}}).crm
    assert crm.dim == 8 and crm == RECLORA_CRM.model_copy(update={"dim": 8})
    assert (crm.dropout, crm.max_len, crm.mlp, crm.activation) == (0.1, 60, (256, 256, 256), "relu")
    assert RecLoraOptions().crm == RECLORA_CRM


def test_the_crm_is_the_authors_din_and_runs_recorded_before_keep_theirs(
    sunny_dir: Path, tmp_path: Path
) -> None:
    """The CRM's MLP is the authors' DIN (spec §4: three hidden layers of 256, ReLU); until 2026-12-04 it was
    256-256 with PReLU. A run recorded then (no `activation`; or only the options given, no `crm`) is rebuilt
    as it ran, and its rerun under today's default is refused, naming the CRM."""
    from typer.testing import CliRunner

    from evolora.cli import app
    from evolora.config import ConventionalConfig
    from evolora.continual import recorded_options
    from evolora.continual.reclora import RecLoraOptions
    from evolora.experiment import restore_run
    from evolora.models.conventional.din import DIN

    din = DIN(RecLoraOptions().crm, None)
    hidden = [m for m in din.mlp if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in hidden] == [256, 256, 256]
    assert {type(m) for m in din.mlp if not isinstance(m, torch.nn.Linear | torch.nn.Dropout)} == {
        torch.nn.ReLU
    }
    assert any(isinstance(m, torch.nn.PReLU) for m in DIN(ConventionalConfig(), None).mlp)  # DIN's own
    then = RecLoraOptions.model_validate(recorded_options({"strategy": "reclora", "options": {"n_meta": 3}}))
    assert (then.crm.mlp, then.crm.activation) == ((256, 256), "prelu")

    # A run of then: its CRM ran PReLU and its record has no `activation`.
    then_crm = "{dim: 8, mlp: [16], max_len: 10, dropout: 0.0, activation: prelu}"
    over = {**OVER, "strategies": f"[{{name: reclora, n_meta: 3, crm: {then_crm}, crm_epochs: 1}}]"}
    cfg = tiny_config(sunny_dir, tmp_path, **over)
    run_experiment(cfg)
    run = run_dir_of(cfg, "reclora", 0)
    record = json.loads((run / "run.json").read_text())
    assert record["options"]["crm"].pop("activation") == "prelu"  # written out, even at DIN's default
    (run / "run.json").write_text(json.dumps(record))
    strategy, _, _ = restore_run(run)
    try:
        assert any(isinstance(m, torch.nn.PReLU) for m in strategy.crm.model.mlp)  # its weights loaded
    finally:
        strategy.teardown()
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    today = f"strategies=[{{name: reclora, n_meta: 3, crm: {CRM}, crm_epochs: 1}}]"
    result = CliRunner().invoke(app, ["run", str(tmp_path / "c.yaml"), "--set", today])
    assert result.exit_code == 2, result.output
    said = result.output.replace("\n", "")
    assert "crm.activation: 'prelu' -> 'relu'" in said and "crm.mlp" not in said, result.output
    assert "pin what it ran with ({name: reclora, crm: {activation: prelu}})" in said, result.output


def test_a_deployed_version_exports_the_adapter_it_answers_a_query_with(tmp_path: Path) -> None:
    """After an update, the served model is the version's: export-user-adapter exports its adapter for a
    (user, item) query, whose prompt the adapter scores with transformers + PEFT alone to what `score`
    answers; --stage still names the run's own stages."""
    from peft import PeftModel
    from typer.testing import CliRunner

    from evolora.api import Recommender
    from evolora.cli import app
    from evolora.deploy.update import update_run
    from evolora.models.weights import load_pretrained
    from tests.helpers import EXAMPLE_TABLE, split_example_log

    split_example_log(tmp_path)
    over = {
        **EXAMPLE_TABLE,
        **OVER,
        "train.samples_per_stage": 32,
        "model.precision": "fp32",
        "strategies": f"[{{name: reclora, n_meta: 3, crm: {CRM}, crm_epochs: 1}}]",
    }
    cfg = tiny_config(tmp_path / "base.csv", tmp_path / "runs", **over)
    run_experiment(cfg)
    root = Path(cfg.output_dir) / cfg.name
    version = update_run(root, tmp_path / "new.csv", overrides=["update.min_gain=-1.0"]).version
    assert version.id == 1 and version.stage == 3  # the run trained stages 1-2

    rec = Recommender.load(root)
    user = rec.known_users[0]
    item = sorted(rec.known_items - rec.seen_by(user))[0]
    answered = rec.score(user=user, items=[item])[0].score
    rec.strategy.teardown()

    # Deployed with version 1 promoted: it is the default, and a query needs its item.
    refused = CliRunner().invoke(app, ["export-user-adapter", str(root), user])
    assert refused.exit_code == 2 and "version 1 (stage 3) answers a user and an item" in refused.output
    assert "pass --item" in refused.output, refused.output
    result = CliRunner().invoke(app, ["export-user-adapter", str(root), f" {user} ", "--item", item])
    assert result.exit_code == 0 and "adapter of version 1 (stage 3)" in result.output, result.output
    folder = root / version.folder / "user-adapters" / f"{user}-{item}"
    about = json.loads((folder / "evolora_user_adapter.json").read_text())
    assert about["version"] == 1 and about["stage"] == 3 and about["sample"]["label"] is None
    assert (about["sample"]["user"], about["sample"]["item"]) == (user, item)
    assert about["p_like"] == pytest.approx(answered, abs=1e-9)
    # the adapter alone, on the base, scores the query's prompt as the served version answers it
    base, _ = load_pretrained("tiny", torch.float32)
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        last = model(input_ids=torch.tensor([about["prompt"]["input_ids"]])).logits[0, -1].float()
    prompt = about["prompt"]
    p_like = torch.softmax(last[[prompt["yes_id"], prompt["no_id"]]], 0)[0].item()
    assert p_like == pytest.approx(answered, abs=1e-5)
    assert "--version 1" in (folder / "README.md").read_text()
    # another (user, item) whose ids name the same folder is not replaced by it
    about["sample"] = {**about["sample"], "user": f"{user}-x", "item": "y"}
    (folder / "evolora_user_adapter.json").write_text(json.dumps(about))
    refused = CliRunner().invoke(app, ["export-user-adapter", str(root), user, "--item", item])
    assert refused.exit_code == 2 and f"holds the adapter of user '{user}-x' and item 'y'" in refused.output
    # an unknown user is told as such (not advised a history, which this command takes not)
    refused = CliRunner().invoke(app, ["export-user-adapter", str(root), "nobody", "--item", item])
    assert refused.exit_code == 2 and "unknown user 'nobody': version 1 knows" in refused.output, (
        refused.output
    )

    # the update's stage is named by its version; the run's own stages as before
    refused = CliRunner().invoke(app, ["export-user-adapter", str(root), user, "--stage", "3"])
    assert refused.exit_code == 2 and "give its version (--version 1" in refused.output, refused.output
    both = ["export-user-adapter", str(root), user, "--stage", "2", "--version", "1"]
    assert "not both" in CliRunner().invoke(app, both).output
    own = CliRunner().invoke(app, ["export-user-adapter", str(root), user, "--version", "0"])
    assert own.exit_code == 0 and "adapter of stage 2 written" in own.output, own.output
