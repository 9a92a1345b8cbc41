"""The CTR task: prompts, answer positions, scoring and the shared-prefix shortcut."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evolora.config import CtrTaskConfig, load_config
from evolora.data.samples import build_samples
from evolora.errors import ConfigError
from evolora.models.llm import LoraLM, splits_prefix
from evolora.tasks.ctr import TEMPLATES, CtrTask
from tests.helpers import staged_frame, tiny_model


@pytest.fixture(scope="module")
def lm() -> LoraLM:
    lm = LoraLM.from_config(tiny_model(lora={"target_modules": ["q_proj", "v_proj"]}))
    with torch.no_grad():  # a non-zero adapter, so LoRA actually enters every computation below
        for _, _, b in lm.lora_pairs():
            b.normal_(0, 0.05)
    return lm


@pytest.fixture(scope="module")
def table():
    rows = []
    for u in range(4):
        for k in range(6):
            rows.append(
                (f"u{u}", f"i{(u + k) % 5}", float(1 + (u * 7 + k) % 5), 100 * k + u, 1 if k < 4 else 2)
            )
    return build_samples(staged_frame(rows), 2, 3.0, history_len=3, min_history=2)


TITLES = {
    f"i{k}": t for k, t in enumerate(["Toy Story (1995)", "Heat (1995)", "Fargo (1996)", "Se7en", "Up"])
}


def make(table, lm, **cfg) -> CtrTask:
    return CtrTask(CtrTaskConfig(**cfg), table, TITLES, lm.tokenizer, item_kind="movie")


def test_prompt_splits_liked_and_disliked_in_time_order(table, lm) -> None:
    task = make(table, lm)
    text = task.render(["i0", "i1", "i2"], [5.0, 2.0, 4.0], "i3")
    assert 'User Preference: "Toy Story (1995)", "Fargo (1996)"\n' in text
    assert 'User Unpreference: "Heat (1995)"\n' in text
    assert 'the target movie "Se7en"?' in text
    assert text.startswith("Below is an instruction") and text.endswith("### Response:\n")


def test_answer_tokens_and_label(table, lm) -> None:
    task = make(table, lm)
    for row in range(len(table)):
        enc = task.encode(row)
        first = task.yes_id if table.df["label"][row] == 1 else task.no_id
        assert enc.answer[0] == first
        assert enc.answer[-1] == lm.tokenizer.eos_token_id
        full = lm.tokenizer.decode(task.prefix + enc.body + enc.answer)
        assert full.removesuffix("</s>").endswith(
            "### Response:\nYes." if enc.label else "### Response:\nNo."
        )


def test_shared_prefix_gives_the_same_scores_and_gradients(table, lm) -> None:
    shared, full = make(table, lm), make(table, lm, share_prefix=False)
    assert len(shared.prefix) > 20 and full.prefix == []
    rows = np.arange(len(table))
    np.testing.assert_allclose(shared.predict(lm, rows, 4), full.predict(lm, rows, 4), atol=1e-5)
    lm.activate("default", trainable=True)
    grads = []
    for task in (shared, full):
        lm.model.zero_grad()
        task.loss(lm, rows[:5]).backward()
        grads.append([a.grad.clone() for _, a, _ in lm.lora_pairs()])
    lm.activate("default", trainable=False)
    for g1, g2 in zip(*grads, strict=True):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)


def test_prefix_pass_and_prefix_in_every_row_give_the_same_scores_and_gradients(table, lm) -> None:
    """The shared prefix runs as a pass of its own on a CPU and in front of every row on a GPU (where the
    extra pass costs more kernel launches than it saves): the same numbers either way."""
    task, rows = make(table, lm), np.arange(len(table))
    passes: list[int] = []
    hook = lm.base.get_decoder().register_forward_pre_hook(lambda module, args: passes.append(1))
    figures = {}
    try:
        for separate in (True, False, None):
            lm.separate_prefix_pass = separate
            passes.clear()
            scores = task.predict(lm, rows, 4)
            calls = len(passes)
            lm.activate("default", trainable=True)
            lm.model.zero_grad()
            task.loss(lm, rows[:5]).backward()
            grads = [a.grad.clone() for _, a, _ in lm.lora_pairs()]
            lm.activate("default", trainable=False)
            figures[separate] = scores, calls, grads
    finally:
        lm.separate_prefix_pass = None
        hook.remove()
    assert figures[True][1] == 2 * figures[False][1] == 2 * -(-len(rows) // 4)
    assert figures[None][1] == figures[True][1]  # a CPU: its own pass
    assert splits_prefix(torch.device("cpu")) and not splits_prefix(torch.device("cuda"))
    np.testing.assert_allclose(figures[True][0], figures[False][0], atol=1e-5)
    for g1, g2 in zip(figures[True][2], figures[False][2], strict=True):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)


def test_score_does_not_depend_on_batch_padding(table, lm) -> None:
    task = make(table, lm)
    rows = np.arange(len(table))
    together = task.predict(lm, rows, batch_size=len(rows))
    alone = np.array([task.predict(lm, rows[i : i + 1], batch_size=1)[0] for i in range(len(rows))])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert np.all((together > 0) & (together < 1))


def test_score_is_softmax_of_yes_no_logits_at_answer_position(table, lm) -> None:
    task = make(table, lm, share_prefix=False)
    row = 3
    enc = task.encode(row)
    ids = torch.tensor([enc.body])
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits[0, -1]
    expected = torch.softmax(logits[[task.yes_id, task.no_id]], dim=-1)[0].item()
    assert task.predict(lm, np.array([row]), 1)[0] == pytest.approx(expected, abs=1e-5)


def test_confident_scores_keep_their_order(table, lm, monkeypatch: pytest.MonkeyPatch) -> None:
    """Yes-No gaps of 18-34 logits stay distinct below 1 (float32 rounded them all to 1.0: tied in AUC)."""
    task = make(table, lm, share_prefix=False)
    gaps = torch.tensor([18.0, 30.0, 24.0, 34.0])
    monkeypatch.setattr(
        task, "answer_logits", lambda _lm, rows: torch.stack([gaps[rows], torch.zeros(len(rows))], 1)
    )
    scores = task.predict(lm, np.arange(4), batch_size=4)
    assert np.all(scores < 1.0)
    assert list(np.argsort(scores)) == [0, 2, 1, 3]


def test_answer_loss_only_counts_answer_tokens(table, lm) -> None:
    task = make(table, lm, share_prefix=False)
    rows = np.array([0, 1])
    with torch.no_grad():
        loss = task.loss(lm, rows).item()
        total, n = 0.0, 0
        for r in rows:
            e = task.encode(int(r))
            seq = torch.tensor([e.body + e.answer])
            logp = torch.log_softmax(lm.model(input_ids=seq).logits[0], dim=-1)
            start = len(e.body) - 1
            for j, tok in enumerate(e.answer):
                total -= logp[start + j, tok].item()
                n += 1
    assert loss == pytest.approx(total / n, rel=1e-4)


def test_long_prompts_drop_oldest_history(table, lm, caplog: pytest.LogCaptureFixture) -> None:
    task = make(table, lm, template="compact")
    full = task.encode(5)
    limit = len(full.body) + len(full.answer) - 1
    shortened = make(table, lm, template="compact", max_length=limit)
    with caplog.at_level("WARNING", logger="evolora.tasks"):
        short = shortened.encode(5)
    assert len(short.body) + len(short.answer) <= limit < len(full.body) + len(full.answer)
    assert shortened.shortened == 1 and "lose their oldest history items" in caplog.text
    hist, target = list(table.df["hist_items"][5]), table.df["item_id"][5]
    oldest = hist[0]
    assert oldest not in hist[1:] and oldest != target  # so its title can only come from the oldest slot
    assert TITLES[oldest] in lm.tokenizer.decode(full.body)
    assert TITLES[oldest] not in lm.tokenizer.decode(short.body)


def test_template_file_and_errors(tmp_path, table, lm) -> None:
    f = tmp_path / "t.txt"
    f.write_text("Likes: {preference}\nDislikes: {unpreference}\nTarget: {target}\nAnswer:\n")
    task = make(table, lm, template=str(f))
    assert task.render(["i0"], [5.0], "i1").startswith('Likes: "Toy Story (1995)"')
    bad = tmp_path / "bad.txt"
    bad.write_text("no fields here")
    with pytest.raises(ConfigError, match="lacks the fields"):
        make(table, lm, template=str(bad))
    with pytest.raises(ConfigError, match="neither a built-in template"):
        load_config(None, ["task.template=nope"])  # caught when the config loads, before any work
    assert set(TEMPLATES) == {"tallrec", "compact"}


def test_a_tokenizer_that_marks_each_texts_start_runs_the_prompt_whole(table) -> None:
    """A SentencePiece-style tokenizer ("▁" before every text it is given, as Llama-2's and Mistral's) read
    the text after the shared prefix with a token the whole prompt does not have: the prompt runs whole."""
    from evolora.tasks.base import prefix_splits_cleanly
    from tests.helpers import sentencepiece_like_tokenizer

    sp = sentencepiece_like_tokenizer()
    task = CtrTask(CtrTaskConfig(), table, TITLES, sp, item_kind="movie")
    assert not prefix_splits_cleanly(sp, task._shared_prefix(task.template), "User Preference:")
    assert task.prefix == [] and task.prefix_text == ""
    for row in range(3):
        enc = task.encode(row)
        r = table.df.row(row, named=True)
        items, ratings = task.history(list(r["hist_items"]), list(r["hist_ratings"]), r["item_id"])
        assert enc.body == list(sp(task.render(items, ratings, r["item_id"]))["input_ids"])
