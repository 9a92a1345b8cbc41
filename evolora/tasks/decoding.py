"""Constrained beam search over item IDs: the model can only ever produce items that exist.

Every item is a fixed-length sequence of ID tokens (its semantic ID). A prefix trie over those sequences
says, after any prefix, which tokens may come next; beam search keeps the `beams` best prefixes per user and
expands each only along the trie, so every finished beam is a real item. The search is batched over users
and beams, and the prompt is run once: its keys and values serve every beam (`_SharedPromptBeams`, or
copies per beam where a shared cache cannot be masked: `_ReplicatedBeams`).

`levelwise=True` gives PESO's looser constraint instead: at position i any token that is the i-th token of
some item is allowed, so beams can end on combinations that are no item (they count as misses).

Past ~400 lines: the teacher-forced scoring of the true item (`sequence_logprob`, with its renormalisation
over the trie) walks the same trie on the same prompt cache as the search, and is checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from evolora.models.kv_cache import cache_of, repeat_rows, run_decoder
from evolora.models.llm import LoraLM
from evolora.models.tokens import pad_token_lists


class ItemTrie:
    """Prefix trie over the items' token-id sequences (all of one length); `indices`: the item index of each
    sequence (default: its position), for a trie over a subset of the items.

    Stored flat rather than as nodes: the sequences sorted lexicographically, one integer column per ID
    position. The items under a prefix are then one contiguous block, found by a binary search per token
    of the prefix, and the prefix's children are the distinct tokens of the next column in that block. At
    10^6 items of 4 tokens this keeps 23 MB, where nested dicts took 455 MB (benchmarks/README.md); a
    lookup costs tens of microseconds, nothing beside a decoder pass.
    """

    def __init__(self, sequences: list[list[int]], indices: list[int] | None = None) -> None:
        lengths = {len(s) for s in sequences}
        if len(lengths) != 1:
            raise ValueError(f"item ID sequences must share one length, got {sorted(lengths)}")
        self.depth = lengths.pop()
        codes = np.asarray(sequences, dtype=np.int64).reshape(len(sequences), self.depth)
        index = np.arange(len(codes)) if indices is None else np.asarray(indices, dtype=np.int64)
        if len(index) != len(codes):
            raise ValueError(f"{len(codes)} ID sequences but {len(index)} item indices")
        if codes.size and codes.min() >= np.iinfo(np.int32).min and codes.max() <= np.iinfo(np.int32).max:
            codes = codes.astype(np.int32)
        order = np.lexsort(codes.T[::-1])  # first token the primary key
        codes, self._index = codes[order], index[order]
        twins = np.flatnonzero((codes[1:] == codes[:-1]).all(axis=1))
        if len(twins):
            a, b = sorted(int(self._index[k]) for k in (twins[0], twins[0] + 1))
            raise ValueError(f"items {a} and {b} share the ID sequence {tuple(codes[twins[0]].tolist())}")
        self._columns = np.ascontiguousarray(codes.T)  # [depth, items]
        self._range = np.iinfo(codes.dtype)
        self.levels = [np.unique(column).tolist() for column in self._columns]

    def __len__(self) -> int:
        return len(self._index)

    def _block(self, prefix: tuple[int, ...]) -> tuple[int, int]:
        """The rows [lo, hi) whose sequences start with `prefix` (empty when none do)."""
        lo, hi = 0, len(self._index)
        dtype = self._columns.dtype
        for level, tok in enumerate(prefix):
            if not self._range.min <= tok <= self._range.max:
                return lo, lo
            # inside the block the earlier tokens are fixed, so this column is sorted there; the token in
            # the column's own type, or searchsorted would convert the whole block to compare
            block, key = self._columns[level, lo:hi], dtype.type(tok)
            lo, hi = lo + int(block.searchsorted(key, "left")), lo + int(block.searchsorted(key, "right"))
            if lo == hi:
                break
        return lo, hi

    def children(self, prefix: tuple[int, ...]) -> list[int]:
        """The tokens that may follow `prefix` ([] after a complete or unknown prefix)."""
        if len(prefix) >= self.depth:
            return []
        if not prefix:
            return list(self.levels[0])
        lo, hi = self._block(prefix)
        if lo == hi:
            return []
        block = self._columns[len(prefix), lo:hi]
        return block[np.flatnonzero(np.r_[True, block[1:] != block[:-1]])].tolist()

    def children_leading_outside(self, prefix: tuple[int, ...], exclude: set[int]) -> list[int]:
        """The tokens that may follow `prefix` and still lead to an item not in `exclude` (a beam that takes
        another would end on no item it may return)."""
        if len(prefix) >= self.depth:
            return []
        lo, hi = self._block(prefix) if prefix else (0, len(self._index))
        block = self._columns[len(prefix), lo:hi]
        starts = np.flatnonzero(np.r_[True, block[1:] != block[:-1]])
        ends = np.r_[starts[1:], len(block)]
        out = []
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            # more items than excluded ones: some item under this token is allowed, without looking
            if e - s > len(exclude) or any(int(i) not in exclude for i in self._index[lo + s : lo + e]):
                out.append(int(block[s]))
        return out

    def item(self, seq: tuple[int, ...]) -> int:
        """Item index of a complete sequence, -1 for a sequence that is no item."""
        if len(seq) != self.depth:
            return -1
        lo, hi = self._block(tuple(seq))
        return int(self._index[lo]) if hi - lo == 1 else -1


@dataclass
class Ranked:
    """Top-k items per query (item indices, -1 for a non-item) with their log-probabilities, best first."""

    items: np.ndarray  # [n, k] int
    scores: np.ndarray  # [n, k] float, -inf where fewer than k items were found
    # log p(true next item | prompt) per query, when the ranker scored it (the `nll` metric)
    target_logp: np.ndarray | None = None
    # the same with each step's distribution renormalised over the trie's valid continuations (`nll_valid`)
    target_logp_valid: np.ndarray | None = None
    # log of the number of candidate items of each query (`log_items`, a uniform guess's nll_valid)
    log_candidates: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, sel: np.ndarray | slice) -> Ranked:
        def part(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[sel]

        return Ranked(
            self.items[sel],
            self.scores[sel],
            part(self.target_logp),
            part(self.target_logp_valid),
            part(self.log_candidates),
        )


def union_candidates(predictions: list[Ranked]) -> list[list[int]]:
    """Per query, every item any of the rankings holds (order of first appearance): what an ensemble of
    ranking models rescores so that all its members score the same items."""
    out = []
    for q in range(len(predictions[0])):
        seen: dict[int, None] = {}
        for p in predictions:
            for item in p.items[q]:
                if item >= 0:
                    seen.setdefault(int(item), None)
        out.append(list(seen))
    return out


def mix_rankings(predictions: list[Ranked], weights: list[float], k: int) -> Ranked:
    """The mixture sum_i w_i p_i of the rankings' item probabilities over the same candidates (as LSAT's
    Eq. 3 mixes its two models' outputs), as log-probabilities, re-ranked; the top `k` kept. The true item's
    log-probability is taken under the same mixture, so its `nll` is a likelihood. (Until 2026-12-04 the
    log-probabilities themselves were mixed: a product of the models without its normaliser, whose `nll`
    was no likelihood and lay above both of the proper mixtures'.)"""
    first = predictions[0]
    for p in predictions[1:]:
        if not np.array_equal(p.items, first.items):
            raise ValueError("mixing needs rankings rescored on the same candidates (see `rescore`)")
    total = _mixture([p.scores for p in predictions], weights)
    total = np.where(first.items >= 0, total, -np.inf)
    order = np.argsort(-total, axis=1, kind="stable")[:, :k]
    target = valid = None
    if all(p.target_logp is not None for p in predictions):
        target = _mixture([p.target_logp for p in predictions], weights)
    if all(p.target_logp_valid is not None for p in predictions):
        valid = _mixture([p.target_logp_valid for p in predictions], weights)
    top_items, top_scores = np.take_along_axis(first.items, order, 1), np.take_along_axis(total, order, 1)
    return Ranked(top_items, top_scores, target, valid, first.log_candidates)


def _mixture(logps: list[Any], weights: list[float]) -> np.ndarray:
    """log sum_i w_i exp(logp_i), elementwise; members of weight 0 left out (log 0 would warn)."""
    terms = [
        np.log(w) + np.asarray(lp, dtype=np.float64) for w, lp in zip(weights, logps, strict=True) if w > 0
    ]
    if not terms:
        raise ValueError("mixing needs a member of positive weight")
    return np.logaddexp.reduce(np.stack(terms), axis=0)


@torch.no_grad()
def beam_search(
    lm: LoraLM,
    prompts: list[list[int]],
    trie: ItemTrie,
    beams: int = 10,
    prefix: list[int] | None = None,
    levelwise: bool = False,
    exclude: list[set[int]] | None = None,
    targets: list[list[int]] | None = None,
) -> Ranked:
    """The `beams` most probable items after each prompt (token ids), by summed token log-probabilities.

    `prefix`: token ids shared by all prompts (run once). `exclude`: per prompt, item indices never to return
    (e.g. items already in the history). `targets`: per prompt, the token ids of one item whose
    log-probability to return as `target_logp` (teacher forced on the prompt's cache: a few tokens each,
    where `sequence_logprob` would run every prompt again).
    """
    device = lm.device
    n = len(prompts)
    # Left padding: every prompt ends at the last column, so all beams extend in step.
    ids, mask = pad_token_lists(prompts, lm.tokenizer.pad_token_id or 0, side="left", device=device)
    decoder = lm.base.get_decoder()
    p_len = len(prefix) if prefix else 0
    cache = None
    positions = (torch.cat([mask.new_ones(n, p_len), mask], dim=1).cumsum(-1) - 1).clamp_min(0)[:, p_len:]
    with lm.autocast():  # the prefix too: in the precision of every other pass (training's, scoring's)
        if prefix:
            cache = cache_of(decoder(input_ids=torch.tensor([prefix], device=device), use_cache=True))
            repeat_rows(cache, n)
            mask = torch.cat([mask.new_ones(n, p_len), mask], dim=1)
        out = run_decoder(
            decoder, cache, input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True
        )
        logits = lm.logits_from_hidden(out.last_hidden_state[:, -1])
    cache = cache_of(out)
    logp = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
    target_logp = target_valid = None
    if targets is not None:
        target_logp, target_valid = _teacher_forced(
            lm, decoder, cache, mask, positions[:, -1:] + 1, logp, targets, trie
        )

    # Beam 0 carries the prompt, the others start dead so step 1 picks distinct tokens.
    vocab = logp.shape[-1]
    if _beams_share_the_prompt(lm, mask.shape[1] + trie.depth * beams):
        stepper: _Beams = _SharedPromptBeams(lm, decoder, cache, mask, positions[:, -1:] + 1, beams)
    else:
        stepper = _ReplicatedBeams(lm, decoder, cache, mask, positions[:, -1:] + 1, beams)
    logp = logp.repeat_interleave(beams, dim=0)
    scores = torch.full((n, beams), float("-inf"), device=device)
    scores[:, 0] = 0.0
    seqs: list[list[tuple[int, ...]]] = [[()] * beams for _ in range(n)]
    level_sets = [torch.tensor(level, device=device) for level in trie.levels]

    for step in range(trie.depth):
        allowed = torch.full((n * beams, vocab), float("-inf"), device=device)
        for q in range(n):
            for b in range(beams):
                row = q * beams + b
                if scores[q, b] == float("-inf"):
                    continue
                if levelwise:
                    allowed[row, level_sets[step]] = 0.0
                    continue
                if exclude and exclude[q]:  # at every level: a beam must not walk into excluded items only
                    nxt = trie.children_leading_outside(seqs[q][b], exclude[q])
                else:
                    nxt = trie.children(seqs[q][b])
                if nxt:
                    allowed[row, nxt] = 0.0
        total = (scores.reshape(-1, 1) + logp + allowed).reshape(n, beams * vocab)
        top, flat = total.topk(beams, dim=-1)  # [n, beams]
        origin, token = flat // vocab, flat % vocab
        scores = top
        seqs = [
            [
                (*seqs[q][int(origin[q, b])], int(token[q, b])) if top[q, b] > float("-inf") else ()
                for b in range(beams)
            ]
            for q in range(n)
        ]
        if step == trie.depth - 1:
            break
        logp = torch.log_softmax(stepper.advance(origin, token).float(), dim=-1)

    items = np.full((n, beams), -1, dtype=np.int64)
    final = scores.cpu().numpy().astype(np.float64)
    for q in range(n):
        for b in range(beams):
            if final[q, b] > -np.inf:
                items[q, b] = trie.item(seqs[q][b])
    return Ranked(items, final, target_logp, target_valid)


class _Beams:
    """How the beams of every prompt advance by one token: `advance(origin, token)` feeds beam b of prompt q
    the token `token[q, b]`, continuing the beam `origin[q, b]` of the previous step, and returns the next
    token's logits, one row per (prompt, beam) in that order."""

    def advance(self, origin: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _ReplicatedBeams(_Beams):
    """Every beam holds its own copy of the prompt's keys and values, reordered as beams survive: what
    any decoder supports."""

    def __init__(
        self, lm: LoraLM, decoder: Any, cache: Any, mask: torch.Tensor, next_pos: torch.Tensor, beams: int
    ) -> None:
        self.lm, self.decoder, self.cache, self.beams = lm, decoder, cache, beams
        repeat_rows(cache, beams)
        self.mask = mask.repeat_interleave(beams, dim=0)
        self.next_pos = next_pos.repeat_interleave(beams, dim=0)

    def advance(self, origin: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        n = origin.shape[0]
        select = (origin + torch.arange(n, device=origin.device)[:, None] * self.beams).reshape(-1)
        self.cache.reorder_cache(select)
        self.mask = torch.cat([self.mask[select], self.mask.new_ones(n * self.beams, 1)], dim=1)
        with self.lm.autocast():
            out = run_decoder(
                self.decoder,
                self.cache,
                input_ids=token.reshape(-1, 1),
                attention_mask=self.mask,
                position_ids=self.next_pos,
                use_cache=True,
            )
            logits = self.lm.logits_from_hidden(out.last_hidden_state[:, -1])
        self.cache = cache_of(out)
        self.next_pos = self.next_pos + 1
        return logits


class _SharedPromptBeams(_Beams):
    """One copy of each prompt's keys and values for all its beams: a step feeds a prompt's beams as
    `beams` positions of one sequence, all at the same position id, and a 4-D attention mask lets beam b
    read the prompt, the tokens of its own ancestors and itself, nothing else. The cache grows by `beams`
    columns per step and is never copied per beam or reordered (the ancestors' columns are looked up
    instead), which took a quarter of next-item evaluation with replicated caches. The same keys and values
    are read as with replicated caches (masked columns weigh exactly zero): the same numbers up to float
    summation order."""

    def __init__(
        self, lm: LoraLM, decoder: Any, cache: Any, mask: torch.Tensor, next_pos: torch.Tensor, beams: int
    ) -> None:
        self.lm, self.decoder, self.cache, self.beams = lm, decoder, cache, beams
        self.prompt_mask = mask.bool()  # [n, prompt columns], left padding False
        self.next_pos = next_pos  # [n, 1]
        n = mask.shape[0]
        # Columns (after the prompt's) of each beam's ancestors' tokens, one per earlier step.
        self.ancestors = torch.empty(n, beams, 0, dtype=torch.long, device=mask.device)

    def advance(self, origin: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        n, beams = origin.shape
        step = self.ancestors.shape[2]
        kept = self.ancestors.gather(1, origin[..., None].expand(n, beams, step))
        own = step * beams + torch.arange(beams, device=origin.device)
        self.ancestors = torch.cat([kept, own.expand(n, beams)[..., None]], dim=2)
        generated = torch.zeros(n, beams, (step + 1) * beams, dtype=torch.bool, device=origin.device)
        generated.scatter_(2, self.ancestors, True)
        prompt = self.prompt_mask[:, None, :].expand(n, beams, self.prompt_mask.shape[1])
        mask = torch.cat([prompt, generated], dim=2)[:, None]  # [n, 1, beams, keys]
        with self.lm.autocast():
            out = run_decoder(
                self.decoder,
                self.cache,
                input_ids=token,
                attention_mask=mask,
                position_ids=(self.next_pos + step).expand(n, beams),
                use_cache=True,
            )
            logits = self.lm.logits_from_hidden(out.last_hidden_state)  # [n, beams, V]
        self.cache = cache_of(out)
        return logits.reshape(n * beams, -1)


def _beams_share_the_prompt(lm: LoraLM, columns: int) -> bool:
    """Whether the decoder takes a custom 4-D boolean attention mask as it is (transformers' SDPA
    attention) and no sliding window could cut the `columns` a search reads: else replicated beams."""
    cfg = lm.base.config
    window = getattr(cfg, "sliding_window", None)
    return getattr(cfg, "_attn_implementation", None) == "sdpa" and (not window or columns <= window)


def _teacher_forced(
    lm: LoraLM,
    decoder: torch.nn.Module,
    cache: Any,
    mask: torch.Tensor,
    next_pos: torch.Tensor,
    first_logp: torch.Tensor,
    targets: list[list[int]],
    trie: ItemTrie,
) -> tuple[np.ndarray, np.ndarray]:
    """log p(target | prompt) for each prompt, continuing its KV cache (the cache is cropped back after):
    over the whole vocabulary, and with each step renormalised over the trie's continuations of the
    target's prefix (the model's distribution over items when decoding is constrained; exclusions left
    aside)."""
    device = first_logp.device
    tokens, valid_ids = pad_token_lists(targets, 0, device=device)
    valid, depth = valid_ids.bool(), tokens.shape[1]
    total = first_logp.gather(1, tokens[:, :1])[:, 0] * valid[:, 0]
    steps = [first_logp]  # [n, V] per step
    if depth > 1:
        # Padding after a shorter target sits behind its real tokens, so causal attention never reads it.
        with lm.autocast():
            out = run_decoder(
                decoder,
                cache,
                input_ids=tokens[:, :-1],
                attention_mask=torch.cat([mask, valid[:, :-1].long()], dim=1),
                position_ids=next_pos + torch.arange(depth - 1, device=device),
                use_cache=True,
            )
            logits = lm.logits_from_hidden(out.last_hidden_state)  # [n, depth - 1, V]
        rest_all = torch.log_softmax(logits.float(), dim=-1)
        rest = rest_all.gather(-1, tokens[:, 1:, None])[..., 0]
        total = total + (rest * valid[:, 1:]).sum(dim=1)
        steps += list(rest_all.unbind(1))
        cache.crop(-(depth - 1))  # negative: tokens to drop (the meaning every transformers version shares)
    renormalised = np.zeros(len(targets))
    for q, target in enumerate(targets):
        if trie.item(tuple(target)) < 0:  # not a candidate: its share among them is undefined
            renormalised[q] = np.nan
            continue
        for k, token in enumerate(target):
            allowed = trie.children(tuple(target[:k]))
            row = steps[k][q]
            renormalised[q] += float(row[token] - torch.logsumexp(row[allowed], dim=0))
    return total.cpu().numpy().astype(np.float64), renormalised


@torch.no_grad()
def sequence_logprob(
    lm: LoraLM, prompts: list[list[int]], targets: list[list[int]], prefix: list[int] | None = None
) -> np.ndarray:
    """log p(target | prompt) summed over the target's tokens, one value per (prompt, target) pair."""
    device = lm.device
    seqs = [p + t for p, t in zip(prompts, targets, strict=True)]
    ids, mask = pad_token_lists(seqs, lm.tokenizer.pad_token_id or 0, device=device)
    with lm.autocast():
        hidden = lm.hidden_states(ids, mask, prefix=torch.tensor(prefix) if prefix else None)
    rows, cols, toks = [], [], []
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        for j, tok in enumerate(t):
            rows.append(i)
            cols.append(len(p) - 1 + j)
            toks.append(tok)
    with lm.autocast():
        logits = lm.logits_from_hidden(
            hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
        )
    logp = torch.log_softmax(logits.float(), dim=-1)[
        torch.arange(len(toks), device=device), torch.tensor(toks, device=device)
    ]
    out = torch.zeros(len(seqs), device=device).index_add_(0, torch.tensor(rows, device=device), logp)
    return out.cpu().numpy().astype(np.float64)
