"""Constrained beam search and ranking metrics on the tiny model."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from evolora.models.llm import LoraLM
from evolora.tasks.decoding import ItemTrie, Ranked, beam_search, mix_rankings, sequence_logprob
from evolora.tasks.next_item import ranking_metrics
from tests.helpers import tiny_model

LEVELS = [[f"<a_{i}>" for i in range(3)], [f"<b_{i}>" for i in range(3)], [f"<c_{i}>" for i in range(3)]]


@pytest.fixture(scope="module")
def setup():
    tokens = [t for level in LEVELS for t in level]
    lm = LoraLM.from_config(tiny_model(), new_tokens=tokens)
    with torch.no_grad():  # a sharper random model so rankings are far from ties
        for _, a, b in lm.lora_pairs():
            a.normal_(0, 0.3)
            b.normal_(0, 0.3)
        for m in lm.token_layers():
            m.trainable_tokens_delta["default"].normal_(0, 1.0)
    items = [list(c) for c in itertools.product(*LEVELS)][:25]  # 25 of the 27 combinations exist
    seqs = [lm.tokenizer.convert_tokens_to_ids(i) for i in items]
    prompts = [
        lm.tokenizer("user likes")["input_ids"],
        lm.tokenizer("another much longer prompt here")["input_ids"],
    ]
    return lm, ItemTrie(seqs), seqs, prompts


def exhaustive(lm, prompts, seqs):
    out = []
    for p in prompts:
        scores = sequence_logprob(lm, [p] * len(seqs), seqs)
        out.append(scores)
    return np.array(out)


def test_trie_knows_items_and_prefixes(setup) -> None:
    _, trie, seqs, _ = setup
    assert trie.depth == 3
    assert sorted(trie.children(())) == sorted({s[0] for s in seqs})
    assert trie.item(tuple(seqs[7])) == 7
    assert trie.item((seqs[0][0], seqs[0][1], -5)) == -1
    with pytest.raises(ValueError, match="share the ID"):
        ItemTrie([[1, 2], [1, 2]])


def test_trie_answers_as_a_brute_force_search_does() -> None:
    """Children, items and misses of the flat trie against scanning every sequence, on random IDs with
    shared prefixes, a subset's own item indices and tokens beyond int32."""
    rng = np.random.default_rng(3)
    seqs = [list(r) for r in {tuple(rng.integers(0, 4, size=4).tolist()) for _ in range(150)}]
    seqs = [[t + 10 * i for i, t in enumerate(s)] for s in seqs]
    indices = [int(i) for i in rng.permutation(1000)[: len(seqs)]]
    trie = ItemTrie(seqs, indices)
    assert len(trie) == len(seqs)
    prefixes = {tuple(s[:k]) for s in seqs for k in range(5)} | {(0, 99), (3, 11, 22, 33, 44), (-1,)}
    for p in prefixes:
        expected = sorted({s[len(p)] for s in seqs if tuple(s[: len(p)]) == p and len(s) > len(p)})
        assert sorted(trie.children(p)) == expected, p
    for s, i in zip(seqs, indices, strict=True):
        assert trie.item(tuple(s)) == i
    assert trie.item((0, 10, 20)) == -1 and trie.item((99, 10, 20, 30)) == -1
    big = ItemTrie([[2**40, 1], [2**40, 2], [5, 1]])
    assert big.children((2**40,)) == [1, 2] and big.item((2**40, 2)) == 1
    with pytest.raises(ValueError, match="items 4 and 9 share the ID"):
        ItemTrie([[1, 2], [3, 4], [1, 2]], [9, 7, 4])
    with pytest.raises(ValueError, match="2 ID sequences but 1 item indices"):
        ItemTrie([[1, 2], [3, 4]], [0])


def test_beam_search_is_exact_when_beams_cover_every_prefix(setup) -> None:
    lm, trie, seqs, prompts = setup
    exact = exhaustive(lm, prompts, seqs)
    # 3 first tokens, 9 two-token prefixes: 10 beams keep every prefix, so the top 10 must be exact.
    ranked = beam_search(lm, prompts, trie, beams=10)
    for q in range(len(prompts)):
        order = np.argsort(-exact[q], kind="stable")[:10]
        assert ranked.items[q].tolist() == order.tolist()
        np.testing.assert_allclose(ranked.scores[q], exact[q][order], atol=1e-4)


def test_beam_search_only_returns_items_and_batches_like_single_queries(setup) -> None:
    lm, trie, seqs, prompts = setup
    ranked = beam_search(lm, prompts, trie, beams=4)
    assert (ranked.items >= 0).all() and (ranked.items < len(seqs)).all()
    for q, p in enumerate(prompts):
        alone = beam_search(lm, [p], trie, beams=4)
        assert alone.items[0].tolist() == ranked.items[q].tolist()
        np.testing.assert_allclose(alone.scores[0], ranked.scores[q], atol=1e-4)


def test_every_pass_of_the_search_runs_in_the_models_precision() -> None:
    """Under bf16-mixed the shared prefix's pass was the one decoder call outside autocast: an fp32 prefix
    under bf16 prompts, as neither training nor scoring runs it (nll moved by ~0.07 nats on SmolLM2)."""
    tokens = [t for level in LEVELS for t in level]
    lm = LoraLM.from_config(tiny_model(precision="bf16-mixed"), new_tokens=tokens)
    seqs = [lm.tokenizer.convert_tokens_to_ids(list(c)) for c in itertools.product(*LEVELS)]
    seen: list[bool] = []
    decoder = lm.base.get_decoder()
    hook = decoder.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    try:
        head = lm.tokenizer("Below is an instruction.\n")["input_ids"]
        beam_search(lm, [lm.tokenizer("user likes")["input_ids"]], ItemTrie(seqs), beams=3, prefix=head)
    finally:
        hook.remove()
    assert len(seen) > 2 and all(seen), seen


def test_shared_prefix_and_exclusion(setup) -> None:
    lm, trie, _, prompts = setup
    head = lm.tokenizer("Below is an instruction.\n")["input_ids"]
    full = [head + lm.tokenizer(" x", add_special_tokens=False)["input_ids"] for _ in prompts]
    body = [f[len(head) :] for f in full]
    a = beam_search(lm, full, trie, beams=6)
    b = beam_search(lm, body, trie, beams=6, prefix=head)
    assert a.items.tolist() == b.items.tolist()
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
    banned = {int(a.items[0, 0]), int(a.items[0, 1])}
    c = beam_search(lm, full[:1], trie, beams=6, exclude=[banned])
    assert not banned & set(c.items[0].tolist())


def test_beam_search_scores_given_targets_on_its_cache(setup) -> None:
    """The true item's log-probability from the prompt cache equals a separate teacher-forced pass, for
    targets of different lengths, with and without a shared prefix, and leaves the ranking untouched."""
    lm, trie, seqs, prompts = setup
    head = lm.tokenizer("Below is an instruction.\n")["input_ids"]
    targets = [seqs[3], seqs[20][:2]]  # a whole item and a shorter token sequence
    for prefix in (None, head):
        plain = beam_search(lm, prompts, trie, beams=6, prefix=prefix)
        ranked = beam_search(lm, prompts, trie, beams=6, prefix=prefix, targets=targets)
        assert plain.target_logp is None
        assert ranked.items.tolist() == plain.items.tolist()
        np.testing.assert_allclose(ranked.scores, plain.scores, atol=1e-5)
        expected = sequence_logprob(lm, prompts, targets, prefix=prefix)
        np.testing.assert_allclose(ranked.target_logp, expected, atol=1e-4)


def test_renormalised_target_logp_is_a_distribution_over_the_items(setup) -> None:
    """Each step renormalised over the trie's continuations: the items' probabilities sum to one, each at
    least its whole-vocabulary probability; the renormalised log-probability of an item is the sum of its
    steps' log-softmax over the allowed tokens, computed here from a teacher-forced pass."""
    lm, trie, seqs, prompts = setup
    for p in prompts:
        ranked = beam_search(lm, [p] * len(seqs), trie, beams=4, targets=seqs)
        assert np.exp(ranked.target_logp_valid).sum() == pytest.approx(1.0, abs=1e-5)
        assert (ranked.target_logp_valid >= ranked.target_logp - 1e-6).all()
        assert np.exp(ranked.target_logp).sum() < 1.0  # mass on tokens that continue no item
    # By hand for one item: the log-probability of each step among that step's valid tokens.
    item = seqs[11]
    steps = []
    for k in range(len(item)):
        allowed = trie.children(tuple(item[:k]))
        cont = [[*item[:k], t] for t in allowed]
        logps = sequence_logprob(lm, [prompts[0]] * len(cont), cont)
        steps.append(logps[allowed.index(item[k])] - np.logaddexp.reduce(logps))
    ranked = beam_search(lm, prompts[:1], trie, beams=4, targets=[item])
    assert ranked.target_logp_valid[0] == pytest.approx(sum(steps), abs=1e-4)


def test_a_target_outside_the_trie_has_no_renormalised_logp(setup) -> None:
    """It was renormalised over the trie's continuations of its prefix: a finite number that meant nothing."""
    lm, trie, seqs, prompts = setup
    items = [list(c) for c in itertools.product(*LEVELS)]
    outside = lm.tokenizer.convert_tokens_to_ids(items[25])  # one of the 2 combinations that are no item
    assert trie.item(tuple(outside)) < 0
    ranked = beam_search(lm, prompts, trie, beams=4, targets=[outside, seqs[3]])
    assert np.isnan(ranked.target_logp_valid[0]) and np.isfinite(ranked.target_logp_valid[1])
    assert np.isfinite(ranked.target_logp).all()


def test_levelwise_constraint_may_produce_non_items(setup) -> None:
    lm, trie, _, prompts = setup
    ranked = beam_search(lm, prompts, trie, beams=27, levelwise=True)
    valid = ranked.scores > -np.inf
    assert valid.sum(axis=1).min() == 27  # every combination of level tokens is reachable
    assert ((ranked.items == -1) & valid).sum() == 2 * len(prompts)  # the 2 combinations that are no item


def test_ranking_metrics_by_hand() -> None:
    items = np.array([[3, 1, 2], [5, 6, 7], [9, 8, 4]])
    targets = np.array([3, 7, 0])
    m = ranking_metrics(items, targets, ks=(1, 3))
    assert m["hit@1"] == pytest.approx(1 / 3)
    assert m["hit@3"] == pytest.approx(2 / 3)
    assert m["ndcg@1"] == pytest.approx(1 / 3)
    assert m["ndcg@3"] == pytest.approx((1.0 + 1 / math.log2(4)) / 3)
    r = Ranked(items, np.zeros_like(items, dtype=float))
    assert len(r[np.array([True, False, True])]) == 2


def test_mixed_rankings_are_the_mixture_of_the_probabilities() -> None:
    """LSAT's next-item ensemble: w * p_long + (1 - w) * p_short, so its nll is a likelihood (mixing the
    log-probabilities gave -log(.9^.5 * .05^.5) = 1.55 nats here instead of -log(.475) = 0.74)."""
    items = np.array([[0, 1, 2]])
    long = Ranked(items, np.log([[0.9, 0.05, 0.05]]), np.log([0.9]))
    short = Ranked(items, np.log([[0.05, 0.9, 0.05]]), np.log([0.05]))
    mixed = mix_rankings([long, short], [0.5, 0.5], k=3)
    assert mixed.target_logp is not None and float(mixed.target_logp[0]) == pytest.approx(math.log(0.475))
    np.testing.assert_allclose(np.exp(mixed.scores[0]), [0.475, 0.475, 0.05])
    assert list(mixed.items[0]) == [0, 1, 2]
    leaning = mix_rankings([long, short], [0.25, 0.75], k=2)
    assert list(leaning.items[0]) == [1, 0]
    np.testing.assert_allclose(
        np.exp(leaning.scores[0]), [0.25 * 0.05 + 0.75 * 0.9, 0.25 * 0.9 + 0.75 * 0.05]
    )
    alone = mix_rankings([long, short], [1.0, 0.0], k=3)  # weight 0: that member is left out, exactly
    np.testing.assert_array_equal(alone.scores, long.scores)
    np.testing.assert_array_equal(alone.target_logp, long.target_logp)


def test_excluded_items_never_swallow_a_beam(setup) -> None:
    """A beam must not walk into a part of the trie that holds only excluded items: it would end on none,
    and the search would return fewer than `beams` items although allowed ones remain."""
    lm, trie, seqs, prompts = setup
    greedy = int(beam_search(lm, prompts[:1], trie, beams=1).items[0, 0])
    banned = {i for i, s in enumerate(seqs) if s[0] == seqs[greedy][0]}  # all of the greedy path's subtree
    for beams in (1, 3):
        found = beam_search(lm, prompts[:1], trie, beams=beams, exclude=[banned]).items[0].tolist()
        assert -1 not in found and not banned & set(found), (beams, found)
    # the trie's answer against scanning every sequence
    for prefix in [(), (seqs[0][0],), tuple(seqs[3][:2]), tuple(seqs[greedy][:2])]:
        expected = {
            s[len(prefix)]
            for i, s in enumerate(seqs)
            if tuple(s[: len(prefix)]) == prefix and i not in banned
        }
        assert sorted(trie.children_leading_outside(prefix, banned)) == sorted(expected)
