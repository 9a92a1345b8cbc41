"""The next-item task end to end: semantic IDs (shipped or built), training, beam-search evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from evolora.experiment import run_dir_of, run_experiment
from tests.helpers import tiny_config, write_peso_cycle

NEXT_ITEM = {
    "task.name": "next_item",
    "task.history_len": 8,
    "task.template": "peso",
    "protocol": "leave_last_out",
    "train.samples_per_stage": 48,
    "train.valid_samples": 16,
    "train.epochs": 1,
    "eval.max_samples": 24,
    "eval.batch_size": 8,
}


@pytest.fixture(scope="module")
def peso_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_peso_cycle(tmp_path_factory.mktemp("cycle"))


def test_peso_blocks_with_shipped_ids(peso_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(
        peso_dir, tmp_path, **NEXT_ITEM, **{"staging.scheme": "preset", "staging.n_stages": "null"}
    )
    frozen, finetune = run_experiment(cfg)
    assert frozen["task"] == "next_item" and frozen["n_stages"] == 3
    assert [s["eval_stage"] for s in finetune["stages"]] == [
        1,
        2,
        3,
    ]  # leave-last-out: each stage tests itself
    for s in finetune["stages"]:
        assert set(s["metrics"]) == {"hit@5", "hit@10", "ndcg@5", "ndcg@10", "nll", "nll_valid", "log_items"}
        assert s["metrics"]["nll"] > s["metrics"]["nll_valid"] > 0
        assert s["metrics"]["log_items"] == pytest.approx(np.log(30))  # 30 items in the cycle data
        assert 0 <= s["metrics"]["ndcg@10"] <= s["metrics"]["hit@10"] <= 1
        assert s["metrics"]["hit@5"] <= s["metrics"]["hit@10"]
    ids = list((Path(cfg.output_dir) / "_shared" / "semantic_ids").glob("*.json"))
    assert len(ids) == 1
    index = json.loads(ids[0].read_text())
    assert index["7"] == ["<a_1>", "<b_1>", "<c_0>"]  # the shipped ID plus the uniqueness level
    preds = run_dir_of(cfg, "finetune", 0) / "stage-2" / "predictions.npz"

    with np.load(preds) as z:
        assert z["items"].shape == (z["rows"].shape[0], 10) and (z["items"] >= 0).all()
        # The true item's likelihood (teacher forced, right-padded) is the score beam search gave it
        # (cached, left-padded) whenever it was among the beams.
        found = z["items"] == z["truth"][:, None]
        assert found.any()
        q, b = np.nonzero(found)
        np.testing.assert_allclose(z["target_logp"][q], z["scores"][q, b], atol=1e-4)
        record = json.loads((preds.parent / "record.json").read_text())
        assert record["metrics"]["nll"] == pytest.approx(-z["target_logp"].mean())
        assert record["metrics"]["nll_valid"] == pytest.approx(-z["target_logp_valid"].mean())
    from evolora.eval.report import build_report

    text, _ = build_report([Path(cfg.output_dir)])
    assert "### NLL per evaluated stage (lower is better)" in text
    # log |items| describes the rows, not a model: the report states it once and compares nothing.
    assert "### LOG_ITEMS" not in text and "### NLL_VALID" in text
    assert (
        f"LOG_ITEMS (a reference of the evaluated rows, not a score: never compared): D1 {np.log(30):.4f}"
        in text
    )
    text, _ = build_report([Path(cfg.output_dir)], ["nll"])
    frozen_row = next(line for line in text.splitlines() if line.startswith("| frozen | ") and "[" in line)
    assert "no paired" not in frozen_row  # the bootstrap pairs the true-item likelihoods row by row
    # The reference asked for first: the bootstrap and plots follow the first metric that scores models
    from evolora.eval.report import compose_report

    report = compose_report([Path(cfg.output_dir)], ["log_items", "nll"])
    assert report.lead == "nll" and "Paired bootstrap: NLL difference" in report.text
    assert "LOG_ITEMS difference" not in report.text and "LOG_ITEMS by user kind" not in report.text


def test_rqvae_ids_from_titles_and_lsat_ensemble(sunny_dir: Path, tmp_path: Path) -> None:
    over = {
        **NEXT_ITEM,
        "task.semantic_ids.levels": 2,
        "task.semantic_ids.codebook_size": 8,
        "task.semantic_ids.epochs": 5,
        "strategies": "[{name: lsat, long_stages: 1, grid: [0.0, 0.5, 1.0]}]",
    }
    cfg = tiny_config(sunny_dir, tmp_path, **over)
    (lsat,) = run_experiment(cfg)
    assert lsat["complete"] and lsat["stages"][-1]["strategy_info"]["alpha"] in (0.0, 0.5, 1.0)
    assert all(s["metrics"]["nll"] > 0 for s in lsat["stages"])  # the ensemble mixes the true item's too
    index = json.loads(next((Path(cfg.output_dir) / "_shared" / "semantic_ids").glob("*.json")).read_text())
    assert len(index) == 60 and len({"".join(v) for v in index.values()}) == 60  # every item, all unique
    # the titles' passes through the decoder are counted (they were 0: the counter came with the adapter)
    embedded = lsat["setup_cost"]["parts"]["item_embeddings"]
    assert embedded["tokens"] > 60 and embedded["backward_tokens"] == 0


def test_semantic_ids_stopped_during_the_rqvae_keep_their_item_embeddings(
    sunny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C during the RQ-VAE lost the item embeddings (kept in memory only): the rerun embedded every item
    text again (42 s on ML-100K, minutes for a 39k-item catalogue), also with the RQ-VAE's settings changed
    after stopping a slow one. The same IDs come out either way."""
    from evolora.tasks import semantic

    over = {
        **NEXT_ITEM,
        "task.semantic_ids.levels": 2,
        "task.semantic_ids.codebook_size": 8,
        "task.semantic_ids.epochs": 5,
        "strategies": "[frozen]",
    }
    whole = tiny_config(sunny_dir, tmp_path / "whole", **over)
    run_experiment(whole)
    (expected,) = (Path(whole.output_dir) / "_shared" / "semantic_ids").glob("*.json")

    embedded, trained = [], semantic.train_rqvae

    def embed(*args: Any, **kwargs: Any) -> Any:
        embedded.append(1)
        return real_embed(*args, **kwargs)

    def stopped(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    real_embed = semantic.embed_texts
    monkeypatch.setattr(semantic, "embed_texts", embed)
    monkeypatch.setattr(semantic, "train_rqvae", stopped)
    slow = tiny_config(sunny_dir, tmp_path / "stopped", **{**over, "task.semantic_ids.epochs": 50})
    with pytest.raises(KeyboardInterrupt):
        run_experiment(slow)
    assert embedded == [1]
    monkeypatch.setattr(semantic, "train_rqvae", trained)
    cfg = tiny_config(sunny_dir, tmp_path / "stopped", **over)  # fewer epochs: other IDs, same embeddings
    run_experiment(cfg, overwrite=True)
    assert embedded == [1]  # taken up, not embedded again
    folder = Path(cfg.output_dir) / "_shared" / "semantic_ids"
    assert (folder / expected.name).read_text() == expected.read_text()
    assert not list(folder.glob("*.embeddings.npz"))  # gone once the IDs are written


@pytest.mark.parametrize(
    "spec",
    [
        "{name: peso, lam: 5.0}",
        "{name: lsat, long_stages: 1, inference: fusion, grid: [0.0, 1.0]}",
        "{name: sumlora, past: all, init: inherit}",
        "{name: sdlora, past: latest, init: fresh}",
        "{name: inflora}",
        "{name: olora, lam: 0.5}",
        "retrain",
    ],
)
def test_every_strategy_runs_the_next_item_task(peso_dir: Path, tmp_path: Path, spec: str) -> None:
    """Strategies built for LoRA factors also carry the trainable semantic-ID rows through the stages."""
    over = {**NEXT_ITEM, "staging.scheme": "preset", "staging.n_stages": "null", "strategies": f"[{spec}]"}
    (res,) = run_experiment(tiny_config(peso_dir, tmp_path, **over))
    assert res["complete"] and [s["eval_stage"] for s in res["stages"]] == [1, 2, 3]
    for s in res["stages"]:
        assert 0 <= s["metrics"]["ndcg@10"] <= s["metrics"]["hit@10"] <= 1
    if "peso" in spec or "olora" in spec:
        assert res["stages"][1]["jobs"][0]["history"][-1]["extra_loss"] > 0


def _token_rows(lm) -> torch.Tensor:
    return torch.cat(
        [layer.trainable_tokens_delta["default"].detach().clone() for layer in lm.token_layers()]
    )


@pytest.mark.parametrize("spec", ["{name: sumlora, init: fresh}", "inflora"])
def test_fresh_cumulative_stages_keep_the_trained_token_rows(
    peso_dir: Path, tmp_path: Path, spec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh start of a cumulative strategy resets the LoRA factors only: the banked updates were learned
    with the semantic-ID rows as trained, so those rows carry on."""
    from evolora.continual import loop as loop_mod

    real, starts, ends, b_norms = loop_mod.train_adapter, [], [], []

    def spy(lm, *args, **kwargs):
        starts.append(_token_rows(lm))
        b_norms.append(sum(float(b.detach().norm()) for _, _, b in lm.lora_pairs("default")))
        result = real(lm, *args, **kwargs)
        ends.append(_token_rows(lm))
        return result

    monkeypatch.setattr(loop_mod, "train_adapter", spy)
    over = {**NEXT_ITEM, "staging.scheme": "preset", "staging.n_stages": "null", "strategies": f"[{spec}]"}
    run_experiment(tiny_config(peso_dir, tmp_path, **over))
    assert len(starts) == 3
    assert not torch.equal(ends[0], starts[0])  # stage 1 trained the rows
    for t in (1, 2):
        torch.testing.assert_close(starts[t], ends[t - 1], atol=0, rtol=0)  # ... and later stages keep them
        assert b_norms[t] == 0.0  # while the LoRA factors start afresh (B = 0)


def test_inflora_statistics_come_from_the_teacher_forced_training_sequences(
    peso_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """InfLoRA's input covariance of a layer equals E[x x^T] over the training sequences (prompt + answer),
    computed here with one plain forward pass per sequence; decoding is never involved."""
    from evolora.config import StrategySpec
    from evolora.continual import Env, build_strategy
    from evolora.experiment import build_model_and_task, prepare_data, resolve_config
    from evolora.tasks.next_item import NextItemTask

    over = {**NEXT_ITEM, "strategies": "[{name: inflora, stats_batch: 1}]"}
    cfg = resolve_config(tiny_config(peso_dir, tmp_path, **over))
    prepared = prepare_data(cfg)
    lm, task = build_model_and_task(cfg, prepared)
    spec = StrategySpec(name="inflora", stats_batch=1)  # one sequence per pass: no padding
    strategy = build_strategy(spec, Env(lm, task, cfg, prepared), seed=0)
    strategy.setup()
    rows = prepared.pools[1].train[:5]

    def no_decoding(*args, **kwargs):
        raise AssertionError("input statistics must not run beam search")

    monkeypatch.setattr(NextItemTask, "predict", no_decoding)
    covs = strategy.input_covariances(rows)
    name, module = next(iter(lm.lora_layers()))
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(
        lambda m, a, o: seen.append(a[0].detach().double().reshape(-1, a[0].shape[-1]))
    )
    with torch.no_grad():
        for r in rows:
            enc = task.encode(r)  # a row index as numpy gives it
            lm.model(input_ids=torch.tensor([task.prefix + enc.body + enc.answer]))
    handle.remove()
    x = torch.cat(seen)
    torch.testing.assert_close(covs[name], x.T @ x / len(x), atol=1e-6, rtol=1e-4)
    assert covs[name].dtype == torch.float64


def test_candidates_seen_ranks_only_items_of_the_rows_stage_or_earlier(tmp_path: Path) -> None:
    """`task.candidates: seen`: the LLM ranks among the items seen by the row's stage, as conventional models
    do; `catalogue` (the default) among every item with an ID, later stages' included."""
    from evolora.data.ids import IdSpace
    from evolora.data.prepare import prepare_data
    from tests.helpers import write_arrivals

    data = write_arrivals(tmp_path / "arrivals")  # later users bring later (higher) item ids
    ids = {"task.semantic_ids.levels": 2, "task.semantic_ids.codebook_size": 8, "task.semantic_ids.epochs": 5}
    over = {**NEXT_ITEM, **ids, "protocol": "next_stage", "eval.max_samples": 12, "strategies": "[frozen]"}
    results = {}
    for candidates in ("catalogue", "seen"):
        cfg = tiny_config(data, tmp_path / candidates, **over, **{"task.candidates": candidates})
        (results[candidates],) = run_experiment(cfg)
        assert results[candidates]["candidates"] == candidates
    prepared = prepare_data(cfg)
    space = IdSpace.from_staged(prepared.staged)
    first = dict(zip(space.item_ids[1:], space.item_first_stage[1:].tolist(), strict=True))
    index = json.loads(next((tmp_path / "seen" / "_shared" / "semantic_ids").glob("*.json")).read_text())
    item_of = list(index)  # the task's item indices follow the ID file's order
    for s in results["seen"]["stages"]:
        with np.load(run_dir_of(cfg, "frozen", 0) / f"stage-{s['train_stage']}" / "predictions.npz") as z:
            ranked = {item_of[i] for i in z["items"].ravel() if i >= 0}
            truth = prepared.table.df["item_id"].to_numpy()[z["rows"]].tolist()
            assert [item_of[i] for i in z["truth"]] == truth  # the index -> item mapping read right
        assert ranked and max(first[i] for i in ranked) <= s["eval_stage"]
        n_seen = sum(1 for i in index if first.get(i, 99) <= s["eval_stage"])
        assert s["metrics"]["log_items"] == pytest.approx(np.log(n_seen))
    later = [s for s in results["catalogue"]["stages"] if s["metrics"]["log_items"] > 0]
    assert all(s["metrics"]["log_items"] == pytest.approx(np.log(len(index))) for s in later)
    assert results["seen"]["stages"][0]["metrics"]["log_items"] < np.log(len(index))
    # An export says which items a row of each stage ranks: each item's first stage beside its ID.
    from evolora.export import export_run

    out = export_run(tmp_path / "seen" / cfg.name, tmp_path / "export")
    stages = json.loads((out / "item_stages.json").read_text())
    assert stages == {i: first[i] for i in index if i in first} and len(stages) < len(index)
    manifest = json.loads((out / "evolora_export.json").read_text())
    assert manifest["seed"] == 0 and "item_stages.json" in manifest["prompt"]["answer"]


def test_exclude_history_rated_never_ranks_an_item_the_user_rated_before(
    peso_dir: Path, tmp_path: Path
) -> None:
    """`task.exclude_history: rated`: the beam search leaves out the user's whole history before the row,
    not only the prompt's `history_len` items (here 2), as a served recommendation does."""
    from evolora.data.prepare import prepare_data

    over = {**NEXT_ITEM, "task.history_len": 2, "staging.scheme": "preset", "staging.n_stages": "null"}
    over.update({"task.exclude_history": "rated", "strategies": "[frozen]"})
    cfg = tiny_config(peso_dir, tmp_path, **over)
    (result,) = run_experiment(cfg)
    table = prepare_data(cfg).table
    index = json.loads(next((tmp_path / "_shared" / "semantic_ids").glob("*.json")).read_text())
    item_of = list(index)
    longer = 0
    for s in result["stages"]:
        with np.load(run_dir_of(cfg, "frozen", 0) / f"stage-{s['train_stage']}" / "predictions.npz") as z:
            rated = table.rated_before(z["rows"])
            for items, before in zip(z["items"], rated, strict=True):
                ranked = {item_of[i] for i in items if i >= 0}
                assert not ranked & set(before)
                assert len(ranked) == min(10, len(index) - len(set(before)))  # all the others, as fit
                longer += len(set(before)) > 2
    assert longer  # rows whose rated items outnumber the prompt's


def test_candidates_given_as_the_default_resume_the_run(
    peso_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An LLM's `auto` candidates are the catalogue: writing it out changes no number, so the experiment is
    not refused as another configuration, whichever way it was recorded first. A Python run's log.txt holds
    the whole log (INFO too), while the script's own handlers get only what the root's level lets through."""
    import logging

    logger = logging.getLogger("evolora")
    before = logger.level
    logger.setLevel(logging.NOTSET)  # as in a fresh script (an earlier CLI test may have set it)
    try:
        _candidates_and_log(peso_dir, tmp_path, caplog)
    finally:
        logger.setLevel(before)


def _candidates_and_log(peso_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    over = {**NEXT_ITEM, "staging.scheme": "preset", "staging.n_stages": "null", "strategies": "[frozen]"}
    first = run_experiment(tiny_config(peso_dir, tmp_path, **over))
    again = run_experiment(tiny_config(peso_dir, tmp_path, **over, **{"task.candidates": "catalogue"}))
    assert again[0]["stages"] == first[0]["stages"]
    back = run_experiment(tiny_config(peso_dir, tmp_path, **over))  # recorded as given, resumed as auto
    assert back[0]["stages"] == first[0]["stages"]
    log_text = (tmp_path / "t" / "log.txt").read_text()
    assert "INFO" in log_text and "running frozen (seed 0)" in log_text
    assert logging.getLogger().getEffectiveLevel() == logging.WARNING  # pytest's default, like a script's
    assert not [r for r in caplog.records if r.name.startswith("evolora") and r.levelno < logging.WARNING]
    assert logging.getLogger("evolora").level == logging.NOTSET and logging.getLogger("evolora").propagate


def test_a_tokenizer_that_marks_each_texts_start_runs_the_prompt_whole() -> None:
    """As for CTR (test_ctr_task.py): a SentencePiece-style tokenizer reads the text after PESO's fixed
    instruction with a word-start token the whole prompt lacks, so the prompt is not split there."""
    from evolora.config import NextItemTaskConfig
    from evolora.data.samples import build_samples
    from evolora.tasks.next_item import NextItemTask
    from tests.helpers import sentencepiece_like_tokenizer, staged_frame

    rows = [
        (f"u{u}", f"i{(u + k) % 5}", 4.0, 100 * k + u, 1 if k < 4 else 2) for u in range(4) for k in range(6)
    ]
    table = build_samples(staged_frame(rows), 2, 3.0, history_len=3, min_history=2)
    sp = sentencepiece_like_tokenizer()
    codes = {f"i{k}": [f"<a_{k}>", f"<b_{k % 2}>"] for k in range(5)}
    sp.add_tokens(sorted({t for toks in codes.values() for t in toks}))
    task = NextItemTask(NextItemTaskConfig(history_len=3), table, codes, sp)
    assert task.prefix == [] and task.prefix_text == ""
    for row in range(3):
        text = task.render(task._prompt_items(row))
        assert task.encode(row).body == list(sp(text)["input_ids"])
