"""`model.merge_lora`: evaluation on base weights with the LoRA update merged in (`models/merged.py`).

The next-item side (every strategy's rankings with the option against the long way) is in
`test_no_recompute.py::test_every_strategy_ranks_as_by_the_long_way`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from evolora.errors import ConfigError
from evolora.experiment import run_dir_of, run_experiment
from evolora.models import merged as merged_module
from evolora.models.llm import LoraLM
from evolora.models.merged import merged_lora
from tests.helpers import tiny_config, tiny_model

IDS = torch.tensor([[1, 5, 9, 30, 2, 7], [3, 3, 8, 1, 40, 2]])


def _logits(lm: LoraLM) -> torch.Tensor:
    return lm.model(input_ids=IDS).logits


def _weights(lm: LoraLM) -> dict[str, torch.Tensor]:
    return {n: m.get_base_layer().weight for n, m in lm.lora_layers()}


@pytest.fixture
def trained() -> LoraLM:
    lm = LoraLM.from_config(tiny_model(merge_lora=True))
    with torch.no_grad():
        for _, _, b in lm.lora_pairs():
            b.normal_(0, 0.3)
    lm.model.eval()
    return lm


def test_merged_passes_equal_the_lora_products_and_leave_the_weights_as_they_were(trained: LoraLM) -> None:
    before = {n: w.detach().clone() for n, w in _weights(trained).items()}
    tensors = {n: w.data for n, w in _weights(trained).items()}
    with torch.no_grad():
        plain = _logits(trained)
        with merged_lora(trained):
            inside = {n: w.detach().clone() for n, w in _weights(trained).items()}
            merged = _logits(trained)
        after = _logits(trained)
    # The update was really merged (else the test below would compare the LoRA path with itself) ...
    assert all(not torch.equal(inside[n], before[n]) for n in before)
    # ... gives the LoRA path's numbers up to fp32 rounding, and puts back the very same weight tensors.
    torch.testing.assert_close(merged, plain, rtol=1e-5, atol=1e-5)
    for n, w in _weights(trained).items():
        assert w.data.data_ptr() == tensors[n].data_ptr()
        assert torch.equal(w, before[n])
    assert torch.equal(after, plain)
    assert not any(m.merged for _, m in trained.lora_layers())


def test_a_zero_update_skips_the_lora_products_bit_for_bit_without_a_copy() -> None:
    lm = LoraLM.from_config(tiny_model(merge_lora=True))  # fresh adapter: B = 0
    lm.model.eval()
    pointers = {n: w.data_ptr() for n, w in _weights(lm).items()}
    with torch.no_grad():
        plain = _logits(lm)
        with merged_lora(lm):
            assert {n: w.data_ptr() for n, w in _weights(lm).items()} == pointers
            assert all(m.merged for _, m in lm.lora_layers())  # PEFT runs the base layer alone
            merged = _logits(lm)
    assert torch.equal(merged, plain)


def test_nothing_is_merged_while_training_with_gradients_or_without_the_option(trained: LoraLM) -> None:
    pointers = {n: w.data_ptr() for n, w in _weights(trained).items()}

    def merged_anything() -> bool:
        with merged_lora(trained):
            return {n: w.data_ptr() for n, w in _weights(trained).items()} != pointers

    assert not merged_anything()  # gradients on
    with torch.no_grad():
        trained.model.train()
        assert not merged_anything()
        trained.model.eval()
        assert merged_anything()
        trained.merge_lora = False
        assert not merged_anything()


def test_an_error_inside_the_block_puts_the_weights_back(trained: LoraLM) -> None:
    before = {n: w.detach().clone() for n, w in _weights(trained).items()}
    with torch.no_grad(), pytest.raises(RuntimeError, match="boom"), merged_lora(trained):
        raise RuntimeError("boom")
    assert all(torch.equal(w, before[n]) for n, w in _weights(trained).items())
    assert not any(m.merged for _, m in trained.lora_layers())


@pytest.mark.parametrize(
    ("precision", "message"),
    [
        ("bf16", "base weights are bfloat16, not fp32"),
        ("bf16-mixed", "under bf16-mixed autocast would round"),
    ],
)
def test_low_precision_weights_are_not_merged_and_it_is_said(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, precision: str, message: str
) -> None:
    monkeypatch.setattr(merged_module, "_said", set())  # said once per process
    lm = LoraLM.from_config(tiny_model(merge_lora=True, precision=precision))
    with torch.no_grad():
        for _, _, b in lm.lora_pairs():
            b.normal_(0, 0.3)
    lm.model.eval()
    pointers = {n: w.data_ptr() for n, w in _weights(lm).items()}
    with caplog.at_level(logging.WARNING, logger="evolora.models"), torch.no_grad(), merged_lora(lm):
        assert {n: w.data_ptr() for n, w in _weights(lm).items()} == pointers
    assert message in caplog.text


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"name": "mf"}, "applies to LLM backbones with LoRA, not to mf"),
        ({"quantization": "nf4"}, "needs unquantized base weights"),
    ],
)
def test_the_option_refuses_models_it_cannot_merge(sets: dict, message: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=message):
        tiny_model(merge_lora=True, **sets)


def test_the_option_at_its_default_keeps_existing_experiment_keys(sunny_dir: Path, tmp_path: Path) -> None:
    from evolora.experiment import context_of

    off = tiny_config(sunny_dir, tmp_path)
    on = tiny_config(sunny_dir, tmp_path, **{"model.merge_lora": "true"})
    assert "merge_lora" not in context_of(off)["model"]  # a folder recorded before the option resumes
    assert context_of(on)["model"]["merge_lora"] is True  # and never mixes with merged evaluations


def test_ctr_runs_score_the_same_with_merged_evaluation(sunny_dir: Path, tmp_path: Path) -> None:
    """frozen, finetune and a cumulative strategy (its bank's hooks stay on the merged layers): the
    same AUC and scores up to fp32 rounding, every stage."""
    sets = {"train.epochs": 1, "strategies": "[frozen, finetune, {name: sumlora, past: all}]"}
    plain_cfg = tiny_config(sunny_dir, tmp_path / "plain", **sets)
    merged_cfg = tiny_config(sunny_dir, tmp_path / "merged", **sets, **{"model.merge_lora": "true"})
    plain, merged = run_experiment(plain_cfg), run_experiment(merged_cfg)
    for a, b in zip(plain, merged, strict=True):
        label = a["method"]
        for t in (1, 2):
            stage = f"stage-{t}/predictions.npz"
            with (
                np.load(run_dir_of(plain_cfg, label, 0) / stage) as x,
                np.load(run_dir_of(merged_cfg, label, 0) / stage) as y,
            ):
                np.testing.assert_allclose(x["scores"], y["scores"], rtol=1e-5, atol=1e-6, err_msg=label)
        auc = [s["metrics"]["auc"] for s in a["stages"]], [s["metrics"]["auc"] for s in b["stages"]]
        np.testing.assert_allclose(*auc, atol=1e-9, err_msg=label)


def test_a_layer_whose_lora_products_carry_a_hook_stays_unmerged(
    trained: LoraLM, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SD-LoRA scales B's output by a learnt magnitude: merging B A alone would drop it."""
    monkeypatch.setattr(merged_module, "_said", set())
    name, layer = next(iter(trained.lora_layers()))
    layer.lora_B["default"].register_forward_hook(lambda module, args, output: output * 3.0)
    pointers = {n: w.data_ptr() for n, w in _weights(trained).items()}
    with torch.no_grad():
        plain = _logits(trained)
        with caplog.at_level(logging.WARNING, logger="evolora.models"), merged_lora(trained):
            moved = {n for n, w in _weights(trained).items() if w.data_ptr() != pointers[n]}
            merged = _logits(trained)
    assert moved == set(pointers) - {name}
    torch.testing.assert_close(merged, plain, rtol=1e-5, atol=1e-5)
    assert "a hook changes what an adapter's products give" in caplog.text


def test_sharded_weights_are_not_merged(trained: LoraLM, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """Under FSDP a weight is a DTensor holding this process's shard: a whole update cannot be added."""
    monkeypatch.setattr(merged_module, "_said", set())
    for _, layer in trained.lora_layers():
        layer.get_base_layer().weight.to_local = lambda: None  # what marks a DTensor here
    pointers = {n: w.data_ptr() for n, w in _weights(trained).items()}
    with caplog.at_level(logging.WARNING, logger="evolora.models"), torch.no_grad(), merged_lora(trained):
        assert {n: w.data_ptr() for n, w in _weights(trained).items()} == pointers
    assert "sharded (FSDP) weights are not merged" in caplog.text
