"""Model families beyond Llama: tiny random Qwen2/Qwen3, Mistral, Gemma/Gemma2/Gemma3 and Phi-3 models built
from their config classes run both tasks, their prompt caches, and a strategy's training."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from evolora.errors import EvoloraError
from evolora.experiment import run_experiment
from evolora.models import weights as weights_mod
from evolora.models.llm import LoraLM
from evolora.models.tiny import available_families, build_tiny
from evolora.tasks.decoding import ItemTrie, beam_search, sequence_logprob
from tests.helpers import tiny_config, tiny_model, write_peso_cycle

FAMILIES = available_families()
LEVELS = [[f"<a_{i}>" for i in range(3)], [f"<b_{i}>" for i in range(3)]]
# The config's default targets: a family without them (Phi-3) falls back to its own.
DEFAULT_TARGETS = "[q_proj, v_proj]"
SMALL_RUN = {
    "model.lora.target_modules": DEFAULT_TARGETS,
    "train.samples_per_stage": 16,
    "train.valid_samples": 8,
    "train.epochs": 1,
    "eval.max_samples": 8,
    "eval.batch_size": 8,
    "strategies": "[finetune]",
}


@pytest.fixture(scope="module")
def peso_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_peso_cycle(tmp_path_factory.mktemp("cycle"), n_users=12, n_blocks=2)


def test_the_families_this_transformers_has() -> None:
    assert {"llama", "qwen2", "mistral", "gemma", "gemma2", "phi3"} <= set(FAMILIES)
    types = {f: build_tiny(f)[0].config.model_type for f in FAMILIES}
    assert types["phi3"] == "phi3" and types["gemma2"] == "gemma2"
    with pytest.raises(EvoloraError, match="no tiny model of family 'gpt9'"):
        weights_mod.load_pretrained("tiny-gpt9", torch.float32)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_caches_and_gradients(family: str) -> None:
    """The shared prefix's cache, beam search's cache and teacher forcing agree with plain passes, and the
    loss reaches every LoRA factor and the new tokens' rows."""
    tokens = [t for level in LEVELS for t in level]
    lm = LoraLM.from_config(tiny_model(name=f"tiny-{family}"), new_tokens=tokens)
    with torch.no_grad():  # a non-zero update, so LoRA enters every computation below
        for _, _, b in lm.lora_pairs():
            b.normal_(0, 0.3)
    tok = lm.tokenizer
    head = tok("Below is an instruction.\n")["input_ids"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("user likes", "a longer prompt here")]
    seqs = [tok.convert_tokens_to_ids(list(c)) for c in itertools.product(*LEVELS)]
    targets = [seqs[3], seqs[7]]

    shared = sequence_logprob(lm, prompts, targets, prefix=head)
    whole = sequence_logprob(lm, [head + p for p in prompts], targets)
    np.testing.assert_allclose(shared, whole, atol=1e-4)
    ranked = beam_search(lm, prompts, ItemTrie(seqs), beams=4, prefix=head, targets=targets)
    assert (ranked.items >= 0).all()
    np.testing.assert_allclose(ranked.target_logp, shared, atol=1e-4)
    best = [seqs[i] for i in ranked.items[:, 0]]
    np.testing.assert_allclose(
        ranked.scores[:, 0], sequence_logprob(lm, prompts, best, prefix=head), atol=1e-4
    )

    ids = torch.tensor([head + prompts[1] + targets[0]])
    with torch.no_grad():  # the family's own output scaling (Gemma 2's soft-capping) as the model applies it
        ours = lm.logits_from_hidden(lm.hidden_states(ids, torch.ones_like(ids)))
        torch.testing.assert_close(ours, lm.model(input_ids=ids).logits.float(), atol=1e-5, rtol=1e-4)

    lm.activate("default", trainable=True)
    lm.model.train()
    hidden = lm.hidden_states(ids, torch.ones_like(ids))
    logits = lm.logits_from_hidden(hidden[0, :-1])
    loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
    loss.backward()
    trained = {n: p for n, p in lm.model.named_parameters() if p.requires_grad}
    assert any("trainable_tokens_delta" in n for n in trained)  # the new tokens' rows
    assert sum("lora_" in n for n in trained) == 2 * len(lm.lora_pairs())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_both_tasks_train_a_strategy(family: str, sunny_dir: Path, peso_dir: Path, tmp_path: Path) -> None:
    """CTR (scores, AUC) and next-item (semantic-ID tokens, beam search) through `finetune`'s training."""
    name = {"model.name": f"tiny-{family}"}
    ctr = tiny_config(sunny_dir, tmp_path / "ctr", **SMALL_RUN, **name, **{"staging.n_stages": 2})
    (result,) = run_experiment(ctr)
    assert result["model"] == f"tiny-{family}" and result["complete"]
    assert 0 <= result["stages"][0]["metrics"]["auc"] <= 1
    assert result["stages"][0]["jobs"][0]["epochs_run"] == 1

    next_item = {
        "task.name": "next_item",
        "task.history_len": 4,
        "task.template": "peso",
        "protocol": "leave_last_out",
        "staging.scheme": "preset",
        "staging.n_stages": "null",
    }
    cfg = tiny_config(peso_dir, tmp_path / "next", **SMALL_RUN, **name, **next_item)
    (result,) = run_experiment(cfg)
    assert result["complete"]
    for stage in result["stages"]:
        assert stage["metrics"]["nll"] > 0 and 0 <= stage["metrics"]["hit@10"] <= 1


def test_lora_targets_follow_the_family(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="evolora.models"):
        phi3 = LoraLM.from_config(tiny_model(name="tiny-phi3"))
    assert phi3.lora.target_modules == ("qkv_proj",)
    assert {n.rsplit(".", 1)[-1] for n, _ in phi3.lora_layers()} == {"qkv_proj"}
    assert "LoRA adapts qkv_proj of tiny-phi3 (the default for phi3 models, which have no q_proj/v_proj)" in (
        caplog.text
    )
    # Llama-style models keep the configured default (and every experiment key with it).
    assert LoraLM.from_config(tiny_model(name="tiny-qwen2")).lora.target_modules == ("q_proj", "v_proj")
    # Modules named on purpose are never swapped for the family's.
    with pytest.raises(EvoloraError, match=r"\['q_proj'\] not found in tiny-phi3 \(phi3; its linear layers"):
        LoraLM.from_config(tiny_model(name="tiny-phi3", lora={"target_modules": ["q_proj", "o_proj"]}))


def test_tokenizers_without_pad_or_eos_get_one() -> None:
    model, tok = build_tiny("mistral")
    tok.pad_token = None
    weights_mod.ensure_pad_token(tok, model)
    assert tok.pad_token_id == tok.eos_token_id is not None
    model, tok = build_tiny("qwen2")
    eos = tok.eos_token_id
    tok.pad_token, tok.eos_token = None, None
    weights_mod.ensure_pad_token(tok, model)  # the model's own end-of-sequence token
    assert tok.eos_token_id == eos == model.config.eos_token_id and tok.pad_token_id == eos
