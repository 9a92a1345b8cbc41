"""`evolora export`: the folder loads with transformers + PEFT alone (a fresh process that never imports
evolora) and gives the run's own scores."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from evolora.cli import app
from evolora.experiment import prepare_data, run_dir_of, run_experiment
from evolora.io import load_npz
from evolora.models.tiny import build_tiny_llama
from tests.helpers import tiny_config, write_peso_cycle

SMALL = {"train.epochs": 1, "train.samples_per_stage": 24, "train.valid_samples": 16, "eval.max_samples": 12}

# Runs in a fresh interpreter: transformers, peft, safetensors and torch only.
CHILD = textwrap.dedent("""
    import json, sys
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def scores(job):
        folder = job["export"]
        tok = AutoTokenizer.from_pretrained(folder)
        if job["merged"]:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(job["base"], dtype=torch.float32)
            model.resize_token_embeddings(len(tok), mean_resizing=False)
            if job["new_tokens"]:
                rows = load_file(folder + "/adapter/new_embeddings.safetensors")
                n = rows["input_embeddings"].shape[0]
                with torch.no_grad():
                    model.get_input_embeddings().weight[-n:] = rows["input_embeddings"]
                    model.get_output_embeddings().weight[-n:] = rows["output_embeddings"]
            model = PeftModel.from_pretrained(model, folder + "/adapter")
        model.eval()
        out = []
        with torch.no_grad():
            for prompt, target in zip(job["prompts"], job["targets"]):
                ids = torch.tensor([prompt + target])
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
                if job["task"] == "ctr":
                    last = logp[len(prompt) - 1]
                    out.append(float(torch.softmax(last[[job["yes"], job["no"]]], 0)[0]))
                else:
                    out.append(float(sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(target))))
        return out

    assert "evolora" not in sys.modules
    jobs = json.load(open(sys.argv[1]))
    json.dump({key: scores(job) for key, job in jobs.items()}, open(sys.argv[2], "w"))
""")


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model saved as a folder: what `base_model_name_or_path` can point at."""
    folder = tmp_path_factory.mktemp("base")
    model, tok = build_tiny_llama()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def child_scores(folder: Path, jobs: dict[str, dict]) -> dict[str, np.ndarray]:
    """Each job's scores, computed in one fresh interpreter (its imports are most of the time)."""
    (folder / "jobs.json").write_text(json.dumps(jobs))
    script = folder / "child.py"
    script.write_text(CHILD)
    done = subprocess.run(
        [sys.executable, str(script), str(folder / "jobs.json"), str(folder / "out.json")],
        capture_output=True, text=True, cwd=folder, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return {key: np.array(v) for key, v in json.loads((folder / "out.json").read_text()).items()}


def export_job(cfg, method: str, out: Path, merge: bool = False) -> tuple[dict, np.ndarray]:
    """(the child's job: score the last stage's evaluation rows from the export `out`; the run's scores)."""
    root = Path(cfg.output_dir) / cfg.name
    args = ["export", str(root), "--method", method, "--out", str(out)] + (["--merge"] if merge else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "evolora_export.json").read_text())
    stored = load_npz(run_dir_of(cfg, method, 0) / f"stage-{manifest['stage']}" / "predictions.npz")
    from evolora.experiment import build_model_and_task

    prepared = prepare_data(cfg)
    _, task = build_model_and_task(cfg, prepared)
    prompts, targets = [], []
    for row in stored["rows"]:
        enc = task.encode(int(row))
        prompts.append(task.prefix + enc.body)
        targets.append([] if cfg.task.name == "ctr" else enc.answer[:-1])  # the ID without the end token
    job = {
        "export": str(out), "base": cfg.model.name, "merged": merge, "task": cfg.task.name,
        "new_tokens": "new_tokens" in manifest, "prompts": prompts, "targets": targets,
        "yes": manifest["prompt"].get("yes_id"), "no": manifest["prompt"].get("no_id"),
    }  # fmt: skip
    return job, stored["scores"] if cfg.task.name == "ctr" else stored["target_logp"]


CTR_EXPORTS = [("finetune", False), ("sumlora", False), ("lsat-ta", True)]


@pytest.fixture(scope="module")
def exports(
    sunny_dir: Path, base_folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[np.ndarray, np.ndarray, Path]]:
    """export folder name -> (the child's scores from the export, the run's stored scores, the folder):
    a CTR run of three strategies and a next-item run with new tokens, exported and scored at once."""
    tmp = tmp_path_factory.mktemp("exports")
    strategies = "[finetune, {name: sumlora, init: fresh}, {name: lsat, label: lsat-ta, inference: fusion}]"
    over = {**SMALL, "model.name": str(base_folder), "strategies": strategies, "staging.n_stages": 4}
    ctr = tiny_config(sunny_dir, tmp / "ctr", **over)
    run_experiment(ctr)
    peso = write_peso_cycle(tmp / "cycle")
    over = {
        **SMALL, "model.name": str(base_folder), "task.name": "next_item", "task.history_len": 8,
        "task.template": "peso", "protocol": "leave_last_out", "strategies": "[{name: sdlora, init: fresh}]",
    }  # fmt: skip
    next_item = tiny_config(peso, tmp / "next-item", **over)
    run_experiment(next_item)
    wanted = [(ctr, method, merge) for method, merge in CTR_EXPORTS] + [(next_item, "sdlora", False)]
    jobs, want, folders = {}, {}, {}
    for cfg, method, merge in wanted:
        key = f"{cfg.task.name}-{method}-{merge}"
        folders[key] = tmp / f"export-{key}"
        jobs[key], want[key] = export_job(cfg, method, folders[key], merge)
    got = child_scores(tmp, jobs)
    return {key: (got[key], want[key], folders[key]) for key in jobs}


@pytest.mark.parametrize(("method", "merge"), CTR_EXPORTS)
def test_ctr_exports_give_the_run_s_scores(exports: dict, method: str, merge: bool) -> None:
    got, want, _ = exports[f"ctr-{method}-{merge}"]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_a_next_item_export_carries_its_new_tokens(exports: dict) -> None:
    got, want, folder = exports["next_item-sdlora-False"]
    np.testing.assert_allclose(got, want, atol=1e-3)
    manifest = json.loads((folder / "evolora_export.json").read_text())
    assert manifest["adapters"]["default"]["rank"] == 8 * 3  # two banked stages and the current adapter
    items = json.loads((folder / "items.json").read_text())
    assert items["7"] == "<a_1><b_1><c_0>"


def test_strategies_without_one_adapter_say_what_to_do(sunny_dir: Path, tmp_path: Path) -> None:
    crm = "{dim: 8, mlp: [16], max_len: 10, dropout: 0.0}"
    over = {
        **SMALL, "task.history_len": 4, "task.retrieve_from": 8, "task.sample_history": 10,
        "strategies": f"[{{name: reclora, n_meta: 2, crm: {crm}, crm_epochs: 1}}, lsat]",
    }  # fmt: skip
    cfg = tiny_config(sunny_dir, tmp_path / "runs", **over)
    run_experiment(cfg)
    root = str(Path(cfg.output_dir) / cfg.name)
    result = CliRunner().invoke(app, ["export", root, "--method", "reclora", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "export-user-adapter" in result.output
    result = CliRunner().invoke(app, ["export", root, "--method", "lsat", "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "e" / "evolora_export.json").read_text())
    assert set(manifest["adapters"]) == {"long", "short"} and sum(manifest["ensemble"].values()) == 1
    # --out replaces a folder only when it is empty or an earlier export: never the run, nor a file.
    again = CliRunner().invoke(app, ["export", root, "--method", "lsat", "--out", str(tmp_path / "e")])
    assert again.exit_code == 0, again.output
    under_a_file = str(tmp_path / "e" / "README.md" / "x")
    for out, message in [
        (root, "holds other files"),
        (str(tmp_path / "e" / "README.md"), "is a file"),
        (under_a_file, "README.md: a file is there, not a folder"),
    ]:
        refused = CliRunner().invoke(app, ["export", root, "--method", "lsat", "--out", out])
        assert refused.exit_code == 2 and message in refused.output, refused.output
    assert (Path(root) / "config.yaml").is_file() and (tmp_path / "e" / "README.md").is_file()
    result = CliRunner().invoke(
        app, ["export", root, "--method", "lsat", "--out", str(tmp_path / "m"), "--merge"]
    )
    assert result.exit_code == 2 and "without --merge" in result.output
