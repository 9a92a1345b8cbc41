"""Semantic IDs of items: unique token sequences such as `<a_51><b_218><c_33><d_0>`, and the text
embeddings they are built from.

`embed_texts` gives the items' embeddings (mean-pooled hidden states of an LLM); an RQ-VAE (`rqvae.py`)
turns them into codes; `make_unique` adds one level numbering items that share all their codes, and
`SemanticIds` renders, saves and extends them (items of later stages, encoded with the quantizer trained on
D1).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evolora.io import atomic_write_text, read_json
from evolora.models.tokens import pad_token_lists
from evolora.progress import task as progress_task

LEVEL_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_TOKEN = re.compile(r"<([a-z])_(\d+)>")


# ------------------------------------------------------------------------------------------------ uniqueness


@dataclass(frozen=True)
class CollisionStats:
    """How many items share their full code with another item."""

    items: int
    unique_codes: int  # distinct code rows
    collision_groups: int  # code rows held by more than one item
    colliding_items: int  # items in such groups
    max_group: int  # largest number of items sharing one code row (1: all unique)


def collision_stats(codes: np.ndarray) -> CollisionStats:
    codes = np.asarray(codes)
    if len(codes) == 0:
        return CollisionStats(0, 0, 0, 0, 0)
    _, counts = np.unique(codes, axis=0, return_counts=True)
    shared = counts[counts > 1]
    return CollisionStats(len(codes), len(counts), len(shared), int(shared.sum()), int(counts.max()))


def make_unique(codes: np.ndarray) -> tuple[np.ndarray, CollisionStats]:
    """Append one level so every row is unique: the item's index within its group of identical codes.

    Unique codes get 0; a group of k items sharing a code gets 0..k-1 in item order. The statistics are of the
    codes before the extra level. PESO's released index leaves such collisions unresolved (two items with one
    ID count as the same prediction); LC-Rec and TIGER append a level like this one.
    """
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim != 2:
        raise ValueError(f"codes must be [n, levels], got shape {codes.shape}")
    stats = collision_stats(codes)
    suffix = np.zeros(len(codes), dtype=np.int64)
    if len(codes):
        _, group = np.unique(codes, axis=0, return_inverse=True)
        group = group.reshape(-1)
        order = np.argsort(group, kind="stable")  # items grouped, each group in item order
        sorted_groups = group[order]
        starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
        run_start = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
        suffix[order] = np.arange(len(order)) - run_start
    return np.column_stack([codes, suffix]), stats


# ----------------------------------------------------------------------------------------------- SemanticIds


@dataclass
class SemanticIds:
    """Semantic IDs of items: `codes[i]` (one int per level) names `item_ids[i]`.

    Level l renders as `<x_c>` with x the l-th letter (a, b, c, ...): codes (51, 218, 33, 0) are
    `<a_51><b_218><c_33><d_0>`, PESO's format. Saved files use PESO's index layout
    (`{item_id: ["<a_51>", ...]}`), so PESO's released index loads with `SemanticIds.load` too.
    """

    item_ids: list[str]
    codes: np.ndarray
    _row: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.item_ids = [str(i) for i in self.item_ids]
        self.codes = np.asarray(self.codes, dtype=np.int64)
        if self.codes.ndim != 2 or len(self.codes) != len(self.item_ids):
            raise ValueError(f"codes must be [{len(self.item_ids)}, levels], got shape {self.codes.shape}")
        if not 1 <= self.levels <= len(LEVEL_LETTERS):
            raise ValueError(f"semantic IDs need 1..{len(LEVEL_LETTERS)} levels, got {self.levels}")
        if (self.codes < 0).any():
            raise ValueError("semantic ID codes must be >= 0")
        self._row = {item: i for i, item in enumerate(self.item_ids)}
        if len(self._row) != len(self.item_ids):
            dup = next(i for i in self.item_ids if self.item_ids.count(i) > 1)
            raise ValueError(f"item {dup!r} appears more than once")

    @classmethod
    def from_codes(cls, item_ids: Sequence[str], codes: np.ndarray, unique: bool = True) -> SemanticIds:
        """From quantizer codes; `unique` appends `make_unique`'s extra level."""
        return cls(list(item_ids), make_unique(codes)[0] if unique else np.asarray(codes))

    @classmethod
    def from_strings(cls, item_ids: Sequence[str], sids: Sequence[str]) -> SemanticIds:
        """Parse strings such as "<a_51><b_218><c_33><d_0>" (PESO's index, joined)."""
        if len(item_ids) != len(sids):
            raise ValueError(f"{len(item_ids)} item ids but {len(sids)} semantic IDs")
        rows = [_parse_sid(s, item) for item, s in zip(item_ids, sids, strict=True)]
        widths = {len(r) for r in rows}
        if len(widths) > 1:
            raise ValueError(f"semantic IDs have different numbers of levels: {sorted(widths)}")
        width = widths.pop() if widths else 1
        return cls(list(item_ids), np.array(rows, dtype=np.int64).reshape(len(rows), width))

    @property
    def levels(self) -> int:
        return self.codes.shape[1]

    def __len__(self) -> int:
        return len(self.item_ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._row

    def tokens(self, item_id: str) -> list[str]:
        return [f"<{LEVEL_LETTERS[level]}_{c}>" for level, c in enumerate(self.codes[self._row[item_id]])]

    def sid(self, item_id: str) -> str:
        return "".join(self.tokens(item_id))

    def codes_in_use(self) -> list[list[int]]:
        """Per level, the codes some item uses, ascending (a model built on these IDs has their tokens)."""
        return [np.unique(self.codes[:, level]).tolist() for level in range(self.levels)]

    def all_tokens(self) -> list[str]:
        """Every token some item uses, ordered by level, then code (the new vocabulary for the LLM)."""
        used = self.codes_in_use()
        return [f"<{LEVEL_LETTERS[level]}_{c}>" for level, codes in enumerate(used) for c in codes]

    def collisions(self) -> CollisionStats:
        return collision_stats(self.codes)

    def extend(
        self,
        new_item_ids: Sequence[str],
        new_codes: np.ndarray,
        max_suffix: int | None = None,
        last_choices: np.ndarray | None = None,
    ) -> SemanticIds:
        """A copy with items that arrived later, encoded with the fixed quantizer (`assign_codes`).

        `new_codes` with one level fewer than these IDs (these carry `make_unique`'s level): each new item
        takes the next free number in its group, counting the existing items with the same codes, so IDs stay
        unique and existing IDs never change. With as many levels as these IDs, they are taken as they are.
        `max_suffix`: the largest number the last level may take (a trained model has tokens up to the
        largest one its items use); an item whose group has none free takes the next of `last_choices[i]`
        (codes of the quantizer's last level, nearest first: `rqvae.last_level_ranking`) whose group has
        one, and is left out where none has (or without `last_choices`).
        """
        new_item_ids = [str(i) for i in new_item_ids]
        new_codes = np.asarray(new_codes, dtype=np.int64)
        if new_codes.ndim != 2 or len(new_codes) != len(new_item_ids):
            raise ValueError(f"new codes must be [{len(new_item_ids)}, levels], got shape {new_codes.shape}")
        known = [i for i in new_item_ids if i in self._row]
        if known:
            raise ValueError(f"{len(known)} items already have semantic IDs (first: {known[0]!r})")
        if new_codes.shape[1] == self.levels:
            return SemanticIds(self.item_ids + new_item_ids, np.vstack([self.codes, new_codes]))
        if new_codes.shape[1] != self.levels - 1:
            raise ValueError(
                f"new codes have {new_codes.shape[1]} levels; expected {self.levels - 1} or {self.levels}"
            )
        next_free: dict[tuple[int, ...], int] = {}
        for row in self.codes:
            key = tuple(row[:-1].tolist())
            next_free[key] = max(next_free.get(key, 0), int(row[-1]) + 1)
        added, rows = [], []
        for i, row in enumerate(new_codes.tolist()):
            lasts = (
                [row[-1]]
                if last_choices is None
                else [row[-1], *(c for c in last_choices[i] if c != row[-1])]
            )
            for last in lasts:
                key = (*row[:-1], int(last))
                number = next_free.get(key, 0)
                if max_suffix is None or number <= max_suffix:
                    added.append(new_item_ids[i])
                    rows.append([*key, number])
                    next_free[key] = number + 1
                    break
        extended = np.array(rows, dtype=np.int64).reshape(-1, self.levels)
        return SemanticIds(self.item_ids + added, np.vstack([self.codes, extended]))

    def save(self, path: str | Path) -> None:
        """PESO's index layout, one JSON object on one line, written atomically."""
        atomic_write_text(path, json.dumps({item: self.tokens(item) for item in self.item_ids}) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SemanticIds:
        raw: Any = read_json(path)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object {{item_id: [tokens]}}")
        sids = []
        for item, tokens in raw.items():
            if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                raise ValueError(
                    f"{path}: item {item!r}: expected a list of token strings, got {tokens!r}"[:300]
                )
            sids.append("".join(tokens))
        return cls.from_strings(list(raw), sids)


def _parse_sid(text: str, item: str) -> list[int]:
    codes = []
    pos = 0
    for level, m in enumerate(_TOKEN.finditer(text)):
        if m.start() != pos or m.group(1) != LEVEL_LETTERS[level]:
            break
        codes.append(int(m.group(2)))
        pos = m.end()
    if pos != len(text) or not codes:
        raise ValueError(f"item {item!r}: {text!r} is not a semantic ID like '<a_51><b_218><c_33><d_0>'")
    return codes


# ------------------------------------------------------------------------------------------------ embeddings


@torch.no_grad()
def embed_texts(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 16,
    max_length: int = 128,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Mean of the last-layer hidden states over each text's tokens [n, hidden], fp32 (PESO's item embedding).

    Texts are padded on the right by hand, whatever the tokenizer's padding side: with a causal model the
    states of real tokens then do not depend on padding, so a text gets the same vector in any batch. Texts
    are batched by length to waste little compute on padding. A `LoraLM.base` includes its active LoRA
    adapter; embed before training it (LoRA starts as the identity) or under `disable_adapter()`.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)[
        "input_ids"
    ]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"text {i} ({texts[i]!r:.60}) has no tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    was_training = model.training
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = np.zeros((len(encoded), 0), dtype=np.float32)
    with progress_task("embedding texts", len(encoded)) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            ids, mask = pad_token_lists([encoded[i] for i in rows], pad, device=device)
            hidden = None
            if decoder is not None:
                hidden = getattr(
                    decoder(input_ids=ids, attention_mask=mask, use_cache=False), "last_hidden_state", None
                )
            if hidden is None:
                hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[
                    -1
                ]
            m = mask.unsqueeze(-1).float()
            pooled = ((hidden.float() * m).sum(1) / m.sum(1)).cpu().numpy()
            if out.shape[1] == 0:
                out = np.zeros((len(encoded), pooled.shape[1]), dtype=np.float32)
            out[rows] = pooled
            bar.advance(len(rows))
    model.train(was_training)
    return out
