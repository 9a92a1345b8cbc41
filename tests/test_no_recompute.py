"""Work evolora no longer repeats changes no prediction (issue 16): every shortcut against the long way.

* LSAT's adapters are shared training results: their scores on a row set are stored once for every run of
  the output folder (the variants, `retrain`, finetune's stage 1) instead of recomputed per variant;
* added-token rows (semantic IDs) at inference without PEFT's copy of the vocabulary matrix per pass;
* a prompt's KV cache repeated for the beams by a broadcast copy instead of `repeat_interleave`;
* next-item prompts batched by length.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from evolora.experiment import run_dir_of, run_experiment
from evolora.models.llm import LoraLM
from tests.helpers import NEXT_ITEM_CYCLE, tiny_config, tiny_model

LSAT_FAMILY = [
    "{name: lsat, label: lsat-en, long_stages: 1}",
    "{name: lsat, label: lsat-full, long_mode: full}",
    "{name: lsat, label: lsat-ta, long_stages: 1, inference: fusion, grid: [0.0, 0.5, 1.0]}",
    "{name: retrain, label: retrain-first, budget: first}",
]


def _predictions(cfg, label: str, stages: int) -> list[np.ndarray]:
    out = []
    for t in range(1, stages + 1):
        with np.load(run_dir_of(cfg, label, 0) / f"stage-{t}" / "predictions.npz") as z:
            out.append(z["scores"].copy())
    return out


def test_lsat_variants_reuse_stored_adapter_scores_and_predict_as_alone(
    sunny_dir: Path, tmp_path: Path
) -> None:
    """In one folder LSAT's variants score each shared adapter once (fewer passes); each gives exactly
    the predictions and chosen weights it gives alone in a folder of its own."""
    from evolora.tasks.ctr import CtrTask

    real, rows_scored = CtrTask.predict, []

    def counting(self, lm, rows, batch_size, desc="scoring"):
        rows_scored.append(len(rows))
        return real(self, lm, rows, batch_size, desc)

    over = {"train.samples_per_stage": "[48, 16]", "train.epochs": 1}
    family = f"[finetune, {', '.join(LSAT_FAMILY)}]"
    together = tiny_config(sunny_dir, tmp_path / "together", strategies=family, **over)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(CtrTask, "predict", counting)
        results = run_experiment(together)
    shared_rows = sum(rows_scored)
    alone_rows = 0
    for spec, res in zip(LSAT_FAMILY, results[1:], strict=True):
        label = res["method"]
        cfg = tiny_config(sunny_dir, tmp_path / label, strategies=f"[{spec}]", **over)
        rows_scored.clear()
        with pytest.MonkeyPatch.context() as m:
            m.setattr(CtrTask, "predict", counting)
            (alone,) = run_experiment(cfg)
        alone_rows += sum(rows_scored)
        for a, b in zip(_predictions(together, label, 2), _predictions(cfg, label, 2), strict=True):
            np.testing.assert_array_equal(a, b)
        assert [s["strategy_info"] for s in res["stages"]] == [s["strategy_info"] for s in alone["stages"]]
    # finetune's passes count in the shared folder only, and still it scores fewer rows.
    assert shared_rows < alone_rows


# ------------------------------------------------------------------------------------- inference paths
TOKENS = ["<a_0>", "<a_1>", "<a_2>", "<b_0>", "<b_1>", "<b_2>"]


@pytest.fixture(scope="module")
def id_lm() -> LoraLM:
    lm = LoraLM.from_config(tiny_model(), new_tokens=TOKENS)
    lm.add_adapter("other")
    with torch.no_grad():
        for name in ("default", "other"):
            for _, _a, b in lm.lora_pairs(name):
                b.normal_(0, 0.2)
            for layer in lm.token_layers():
                layer.trainable_tokens_delta[name].normal_(0, 1.0)
    return lm


def _peft_path(layer, x):
    """PEFT's own forward of a trainable-token layer (the whole merged matrix)."""
    return super(type(layer), layer).forward_adapters(x, layer.active_adapters)


def test_added_token_rows_without_the_merged_matrix_give_peft_numbers_bit_for_bit(id_lm: LoraLM) -> None:
    lm = id_lm
    ids = torch.tensor([[1, 5, *lm.new_token_ids[:3], 7], [*lm.new_token_ids[3:], 2, 3, 4]])
    layers = list(lm.token_layers())
    embedding = next(m for m in layers if isinstance(m.base_layer, torch.nn.Embedding))
    head = next(m for m in layers if isinstance(m.base_layer, torch.nn.Linear))
    hidden = torch.randn(2, 6, head.base_layer.in_features)
    for adapter in ("default", "other", "default"):  # switching adapters invalidates what is kept
        lm.activate(adapter, trainable=False)
        with torch.no_grad():
            assert torch.equal(embedding(ids), _peft_path(embedding, ids))
            assert torch.equal(head(hidden), _peft_path(head, hidden))
    with torch.no_grad():  # rows written in place (an optimiser step, a loaded adapter) are seen
        head.trainable_tokens_delta["default"].add_(0.5)
        assert torch.equal(head(hidden), _peft_path(head, hidden))
        assert torch.equal(embedding(ids), _peft_path(embedding, ids))
    # With gradients PEFT's path runs: the rows get their gradients.
    lm.activate("default", trainable=True)
    embedding(ids).sum().backward()
    grad = embedding.trainable_tokens_delta["default"].grad
    assert grad is not None and float(grad.abs().sum()) > 0
    lm.activate("default", trainable=False)


def test_kv_cache_repeated_by_broadcast_equals_repeat_interleave(id_lm: LoraLM) -> None:
    from evolora.models.kv_cache import cache_of, repeat_rows

    decoder = id_lm.base.get_decoder()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        ours, theirs = (cache_of(decoder(input_ids=ids, use_cache=True)) for _ in range(2))
        repeat_rows(ours, 4)
        theirs.batch_repeat_interleave(4)
    for a, b in zip(ours.layers, theirs.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_next_item_predictions_do_not_depend_on_row_order_or_batch(cycle_dir: Path, tmp_path: Path) -> None:
    """Prompts batched by length: any order and batch size gives every row the same ranking."""
    from evolora.experiment import build_model_and_task, prepare_data

    cfg = tiny_config(cycle_dir, tmp_path / "out", **NEXT_ITEM_CYCLE)
    prepared = prepare_data(cfg)
    lm, task = build_model_and_task(cfg, prepared)
    with torch.no_grad():
        for _, _a, b in lm.lora_pairs():
            b.normal_(0, 0.3)
    rows = prepared.pools[2].test[:12]
    one = task.predict(lm, rows, batch_size=1)
    shuffled = np.random.default_rng(0).permutation(len(rows))
    batched = task.predict(lm, rows[shuffled], batch_size=5)
    np.testing.assert_array_equal(batched.items, one.items[shuffled])
    np.testing.assert_allclose(batched.scores, one.scores[shuffled], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batched.target_logp, one.target_logp[shuffled], rtol=1e-5, atol=1e-5)


def test_beams_on_one_prompt_cache_equal_replicated_caches(id_lm: LoraLM, monkeypatch) -> None:
    """Beams read the prompt's one cache through a 4-D mask: the same rankings, scores and target
    likelihoods as with the prompt's cache copied for every beam (any decoder's fallback)."""
    from evolora.tasks import decoding

    lm = id_lm
    lm.activate("default", trainable=False)
    level = {t: lm.tokenizer.convert_tokens_to_ids(t) for t in TOKENS}
    items = [[level[f"<a_{i}>"], level[f"<b_{j}>"]] for i in range(3) for j in range(3) if (i, j) != (2, 2)]
    trie = decoding.ItemTrie(items)
    prompts = [lm.tokenizer(text)["input_ids"] for text in ("a user", "another user with a longer history")]
    prefix = lm.tokenizer("Recommend.")["input_ids"]
    kwargs = {"beams": 4, "prefix": prefix, "exclude": [{0}, set()], "targets": [items[3], items[5]]}
    shared = decoding.beam_search(lm, prompts, trie, **kwargs)
    monkeypatch.setattr(decoding, "_beams_share_the_prompt", lambda lm, columns: False)
    replicated = decoding.beam_search(lm, prompts, trie, **kwargs)
    np.testing.assert_array_equal(shared.items, replicated.items)
    np.testing.assert_allclose(shared.scores, replicated.scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(shared.target_logp, replicated.target_logp, rtol=1e-6)
    assert (shared.items[0] != 0).all()  # excluded


def test_beams_fall_back_to_replicated_caches_where_a_mask_would_not_hold(id_lm: LoraLM) -> None:
    from evolora.tasks.decoding import _beams_share_the_prompt

    cfg = id_lm.base.config
    assert _beams_share_the_prompt(id_lm, 50)
    old_window, old_impl = getattr(cfg, "sliding_window", None), cfg._attn_implementation
    try:
        cfg.sliding_window = 32  # a window the search's columns pass
        assert not _beams_share_the_prompt(id_lm, 50)
        cfg.sliding_window = None
        cfg._attn_implementation = "eager"  # adds the mask as numbers: a boolean one would be misread
        assert not _beams_share_the_prompt(id_lm, 50)
    finally:
        cfg.sliding_window, cfg._attn_implementation = old_window, old_impl


EVERY = [
    "frozen",
    "finetune",
    "retrain",
    "{name: peso, lam: 5.0}",
    "{name: lsat, long_stages: 1}",
    "{name: lsat, label: lsat-ta, long_stages: 1, inference: fusion, grid: [0.0, 1.0]}",
    "{name: sumlora, past: all, init: inherit}",
    "{name: sdlora, past: latest, init: fresh}",
    "inflora",
    "{name: olora, lam: 0.5}",
]


def test_every_strategy_ranks_as_by_the_long_way(cycle_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """A tiny next-item experiment with every strategy, run with the shortcuts (one prompt cache for the
    beams, looked-up token rows, stored scores in one folder, `model.merge_lora`) and without them (copies
    per beam, PEFT's merged matrix, the LoRA products, each strategy in a folder of its own): the same
    rankings and scores at every stage."""
    import evolora.models.token_rows as token_rows
    from evolora.tasks import decoding

    sets = {
        **NEXT_ITEM_CYCLE,
        "train.samples_per_stage": 32,
        "train.valid_samples": 8,
        "train.epochs": 1,
        "eval.max_samples": 12,
        "eval.batch_size": 4,
    }
    fast_sets = {**sets, "model.merge_lora": "true"}
    fast_cfg = tiny_config(cycle_dir, tmp_path / "fast", strategies=f"[{', '.join(EVERY)}]", **fast_sets)
    fast = run_experiment(fast_cfg)
    monkeypatch.setattr(decoding, "_beams_share_the_prompt", lambda lm, columns: False)
    monkeypatch.setattr(token_rows, "install", lambda model: 0)
    for spec, res in zip(EVERY, fast, strict=True):
        label = res["method"]
        cfg = tiny_config(cycle_dir, tmp_path / f"slow-{label}", strategies=f"[{spec}]", **sets)
        run_experiment(cfg)
        for t in (1, 2, 3):
            stage = f"stage-{t}/predictions.npz"
            with (
                np.load(run_dir_of(fast_cfg, label, 0) / stage) as a,
                np.load(run_dir_of(cfg, label, 0) / stage) as b,
            ):
                np.testing.assert_array_equal(a["items"], b["items"], err_msg=f"{label} {stage}")
                finite = np.isfinite(b["scores"])
                np.testing.assert_array_equal(np.isfinite(a["scores"]), finite)
                np.testing.assert_allclose(a["scores"][finite], b["scores"][finite], rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(a["target_logp"], b["target_logp"], rtol=1e-5, atol=1e-5)
