"""The semantic IDs of a run's items: taken from the dataset or built by evolora, then cached.

Building them (`source: rqvae`): item text -> embedding (the backbone's mean-pooled hidden states, before any
adapter, or another HF model) -> an RQ-VAE trained on the items that appear in stage 1 only -> codes for
every item from that fixed quantizer -> one extra level where codes collide. Items of stage 1 come first, so
their IDs do not depend on which items arrive later: the vocabulary is fixed from D1 on, as a deployed
tokenizer would be.

IDs are cached under `<output_dir>/_shared/semantic_ids/`, keyed by what they are made of (the items' order,
texts or given IDs, the stage-1 items, the settings, a fingerprint of the embedder's weights), so every
strategy and every rerun of an experiment uses the same IDs, and an experiment on items edited in place, or
on other weights, builds its own. The RQ-VAE is kept beside them, so the items an update (`evolora update`)
brings are encoded by the same quantizer (`add_new_items`). The file a task was built from is noted in
`Prepared.caches`, which is how a run's bundle, its updates and its continued experiment find it again
(an older evolora keyed the caches by settings only: `*_by_settings`). While IDs are built, the item
embeddings wait beside them (`embeddings_path`), so a build stopped in the RQ-VAE does not embed again.

(A little past 400 lines: the retrieval vectors, the IDs and an update's new items share the keys and
caches above; split, each part would import the others'.)
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import polars as pl

from evolora import cost
from evolora.config import NextItemTaskConfig, RunConfig, SemanticIdConfig
from evolora.data.prepare import Prepared
from evolora.data.schema import InteractionData, item_fields
from evolora.errors import ConfigError, DamagedFileError, DataError
from evolora.io import load_npz, save_npz, stable_hash
from evolora.models.conventional import is_conventional
from evolora.models.rqvae import RQVAE, assign_codes, last_level_ranking, train_rqvae
from evolora.models.semantic_ids import SemanticIds, embed_texts, make_unique
from evolora.models.weights import weights_fingerprint

log = logging.getLogger("evolora.tasks")


def item_order(data: InteractionData, staged: pl.DataFrame) -> list[str]:
    """Items of stage 1 by first appearance, then later items by first appearance, then the rest."""
    early = staged.filter(pl.col("stage") <= 1)["item_id"].to_list()  # staged is in time order
    later = staged.filter(pl.col("stage") > 1)["item_id"].to_list()
    return list(dict.fromkeys([*early, *later, *data.items["item_id"].to_list()]))


def item_texts(data: InteractionData, items: list[str], fields: tuple[str, ...]) -> list[str]:
    """Each item's text: its `fields` joined, "item <id>" for an item with none of them filled."""
    table = data.items.select(["item_id", *item_fields(data.items, fields, "text_fields")])
    rows = {r["item_id"]: r for r in table.iter_rows(named=True)}
    texts = []
    for item in items:
        parts = [str(rows[item][f]) for f in fields if f in rows[item] and rows[item][f]]
        texts.append(". ".join(parts) or f"item {item}")
    return texts


def _embedder(cfg: SemanticIdConfig, pretrained: tuple[Any, Any]) -> tuple[Any, Any]:
    if cfg.embedder == "backbone":
        return pretrained
    from transformers import AutoModel, AutoTokenizer

    try:
        return AutoModel.from_pretrained(cfg.embedder), AutoTokenizer.from_pretrained(cfg.embedder)
    except OSError as e:
        raise ConfigError(f"task.semantic_ids.embedder={cfg.embedder!r} could not be loaded: {e}") from None


#: the item fields whose text the CTR task's history retrieval embeds
RETRIEVAL_FIELDS = ("title", "genre", "category")


def item_vectors_path(
    cfg: RunConfig,
    data: InteractionData,
    pretrained: tuple[Any, Any],
    fields: tuple[str, ...] = RETRIEVAL_FIELDS,
) -> Path:
    """Where item embeddings are cached (under `cfg.shared_root`), keyed by what they are made of: every
    item's text and the backbone (its name for the tokenizer, its weights' fingerprint)."""
    items = data.items["item_id"].to_list()
    key = stable_hash(
        {"model": cfg.model.name, "weights": weights_fingerprint(pretrained[0]), "fields": fields,
         "texts": _digest(zip(items, item_texts(data, items, fields), strict=True))},
        16,
    )  # fmt: skip
    return cfg.shared_root / "item_vectors" / f"{key}.npz"


def item_vectors_path_by_settings(cfg: RunConfig, fields: tuple[str, ...] = RETRIEVAL_FIELDS) -> Path:
    """Where an evolora before 2026-12-05 cached them, keyed by the data and model settings only: found
    for the runs it made (their bundles, their experiments continued)."""
    key = stable_hash(
        {"data": cfg.data.model_dump(mode="json"), "model": cfg.model.name, "fields": fields}, 16
    )
    return cfg.shared_root / "item_vectors" / f"{key}.npz"


def _digest(rows: Any) -> str:
    """sha256 of rows of strings, one per line, fields tab-separated."""
    h = hashlib.sha256()
    for row in rows:
        h.update(("\t".join(map(str, row)) + "\n").encode("utf-8"))
    return h.hexdigest()


def item_vectors_for(
    cfg: RunConfig,
    prepared: Prepared,
    pretrained: tuple[Any, Any],
    fields: tuple[str, ...] = RETRIEVAL_FIELDS,
) -> dict[str, np.ndarray]:
    """Unit-length text embeddings of every item (the backbone's mean-pooled hidden states), cached: in the
    file `prepared.caches` names (a trained run's own), else under `item_vectors_path`; noted there.

    Used by the CTR task's semantic history retrieval (ReLLa, RecLoRA), where cosine similarity to the
    target decides which history items the prompt shows.
    """
    data = prepared.data
    path = prepared.caches.get("item_vectors") or item_vectors_path(cfg, data, pretrained, fields)
    items = data.items["item_id"].to_list()
    stored = load_npz(path, "Delete it: the embeddings are computed again.") if path.is_file() else None
    if stored is not None and len(stored["vectors"]) == len(items):
        vectors = stored["vectors"]
    else:
        log.info("embedding %d item texts for history retrieval", len(items))
        with cost.part("item_embeddings"):
            vectors = embed_texts(*pretrained, item_texts(data, items, fields))
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
        save_npz(path, {"vectors": vectors})
    prepared.caches["item_vectors"] = path
    return dict(zip(items, vectors, strict=True))


def items_have_ids(items: pl.DataFrame) -> bool:
    """Whether an item table carries semantic IDs of its own (what `source: auto` decides by)."""
    return "sid" in items.columns and items["sid"].null_count() < items.height


def _id_source(sid_cfg: SemanticIdConfig, data: InteractionData) -> str:
    """Where a run's IDs come from: `dataset` (its items' own) or `rqvae`; `auto` is `dataset` where the
    items carry IDs."""
    if sid_cfg.source != "auto":
        return sid_cfg.source
    return "dataset" if items_have_ids(data.items) else "rqvae"


def semantic_ids_path(
    cfg: RunConfig, data: InteractionData, staged: pl.DataFrame, pretrained: tuple[Any, Any]
) -> Path:
    """Where a run's semantic IDs are cached (under `cfg.shared_root`), keyed by what they are made of: the
    ID settings, the items in order with their texts (or their own IDs), which are stage-1 items (the
    RQ-VAE's fit), and the embedder (the backbone's weights' fingerprint, or another model's name)."""
    sid_cfg: SemanticIdConfig = cast(NextItemTaskConfig, cfg.task).semantic_ids
    source = _id_source(sid_cfg, data)
    order = item_order(data, staged)
    first = set(staged.filter(pl.col("stage") <= 1)["item_id"].to_list())
    if source == "dataset":
        sid = data.items["sid"].to_list() if "sid" in data.items.columns else []  # none: refused on building
        given = dict(zip(data.items["item_id"].to_list(), sid, strict=False))
        rows: list[tuple[Any, ...]] = [(item, given.get(item)) for item in order]
        embedder: Any = None
    else:
        texts = item_texts(data, order, sid_cfg.text_fields)
        rows = [(item, item in first, text) for item, text in zip(order, texts, strict=True)]
        embedder = _embedder_key(cfg, sid_cfg, pretrained)
    what = {"ids": sid_cfg.model_dump(mode="json"), "source": source, "embedder": embedder}
    key = stable_hash({**what, "items": _digest(rows)}, 16)
    return cfg.shared_root / "semantic_ids" / f"{key}.json"


def _embedder_key(cfg: RunConfig, sid_cfg: SemanticIdConfig, pretrained: tuple[Any, Any]) -> Any:
    """What names the model that embeds item texts: another model's name, or the backbone's name and a
    fingerprint of its weights."""
    if sid_cfg.embedder != "backbone":
        return sid_cfg.embedder
    return {"model": cfg.model.name, "weights": weights_fingerprint(pretrained[0])}


def embeddings_path(cfg: RunConfig, order: list[str], texts: list[str], pretrained: tuple[Any, Any]) -> Path:
    """Where item embeddings wait while semantic IDs are built (a build stopped in the RQ-VAE takes them up
    again), keyed by what they are made of alone: the items' texts in order and the embedder, not the
    RQ-VAE's settings, which a user changes after stopping a slow one."""
    sid_cfg: SemanticIdConfig = cast(NextItemTaskConfig, cfg.task).semantic_ids
    key = stable_hash(
        {
            "embedder": _embedder_key(cfg, sid_cfg, pretrained),
            "items": _digest(zip(order, texts, strict=True)),
        },
        16,
    )
    return cfg.shared_root / "semantic_ids" / f"{key}.embeddings.npz"


def semantic_ids_path_by_settings(cfg: RunConfig, data: InteractionData) -> Path:
    """Where an evolora before 2026-12-05 cached them, keyed by settings only (data, staging, IDs, model
    name): found for the runs it made. An update's work folder, which is its own, keeps its IDs there too."""
    sid_cfg: SemanticIdConfig = cast(NextItemTaskConfig, cfg.task).semantic_ids
    source = _id_source(sid_cfg, data)
    key = stable_hash(
        {"data": cfg.data.model_dump(mode="json"), "staging": cfg.staging.model_dump(mode="json"),
         "ids": sid_cfg.model_dump(mode="json"), "source": source,
         "model": cfg.model.name if sid_cfg.embedder == "backbone" else None},
        16,
    )  # fmt: skip
    return cfg.shared_root / "semantic_ids" / f"{key}.json"


def caches_by_settings(cfg: RunConfig, data: InteractionData) -> dict[str, Path]:
    """The cache files an evolora before 2026-12-05 kept for a run of `cfg` (keyed by settings, under
    `cfg.shared_root`), those that exist: an LLM next-item run's semantic IDs, or the item embeddings of a
    CTR run that retrieves its history by them. Its runs (their bundles, their experiments continued) read
    these."""
    if is_conventional(cfg.model.name):
        return {}
    if cfg.task.name == "next_item":
        paths = {"semantic_ids": semantic_ids_path_by_settings(cfg, data)}
    elif getattr(cfg.task, "retrieve_from", None) is not None:
        paths = {"item_vectors": item_vectors_path_by_settings(cfg)}
    else:
        paths = {}
    return {kind: path for kind, path in paths.items() if path.is_file()}


def quantizer_path(ids_path: Path) -> Path:
    """The RQ-VAE that built the IDs at `ids_path`, beside them: an update encodes its new items with it."""
    return ids_path.with_name(f"{ids_path.stem}.rqvae.safetensors")


def semantic_ids_for(cfg: RunConfig, prepared: Prepared, pretrained: tuple[Any, Any]) -> SemanticIds:
    """The run's semantic IDs, cached: in the file `prepared.caches` names (a trained run's own), else under
    `semantic_ids_path`; noted there. `pretrained`: the backbone (model, tokenizer), without adapters."""
    sid_cfg: SemanticIdConfig = cast(NextItemTaskConfig, cfg.task).semantic_ids
    data, staged = prepared.data, prepared.staged
    source = _id_source(sid_cfg, data)
    path = prepared.caches.get("semantic_ids")
    if path is None and staged is not None:
        path = semantic_ids_path(cfg, data, staged, pretrained)
    if path is None or (staged is None and not path.is_file()):  # a trained run's bundle without them
        raise DataError(
            f"the semantic IDs this trained run was built with are missing from {cfg.shared_root.parent} "
            "(a run's own inference folder, deleted, is rebuilt from its data on the next load)"
        )
    prepared.caches["semantic_ids"] = path
    if path.is_file():
        sids = SemanticIds.load(path)
        log.info("semantic IDs: %d items, %d levels (cached %s)", len(sids), sids.levels, path.name)
        return sids
    assert staged is not None  # (checked above: IDs are built from the staged data)
    waiting = None  # the item embeddings of a build in progress (`embeddings_path`)
    if source == "dataset":
        if not items_have_ids(data.items):
            raise ConfigError("task.semantic_ids.source=dataset but this dataset ships no semantic IDs")
        with_sid = data.items.filter(pl.col("sid").is_not_null())
        try:
            raw = SemanticIds.from_strings(with_sid["item_id"].to_list(), with_sid["sid"].to_list())
        except ValueError as e:  # the data's own IDs: a problem of the file, named with its item
            raise DataError(
                f"{data.name}: the items' semantic IDs (data.columns.sid or the index): {e}"
            ) from None
        row = {item: i for i, item in enumerate(raw.item_ids)}
        order = [i for i in item_order(data, staged) if i in row]
        codes = raw.codes[[row[i] for i in order]]
        unique, stats = make_unique(codes)
        sids = SemanticIds(order, unique)
    else:
        order = item_order(data, staged)
        texts = item_texts(data, order, sid_cfg.text_fields)
        waiting = embeddings_path(cfg, order, texts, pretrained)
        emb = _item_embeddings(sid_cfg, texts, pretrained, waiting)
        first = set(staged.filter(pl.col("stage") <= 1)["item_id"].to_list())
        fit = np.array([i in first for i in order])
        if fit.sum() < sid_cfg.codebook_size:
            log.warning(
                "only %d stage-1 items to fit %d codes per level; the RQ-VAE fits all %d items instead",
                int(fit.sum()), sid_cfg.codebook_size, len(order),
            )  # fmt: skip
            fit[:] = True
        with cost.part("rqvae"):
            quantizer = train_rqvae(
                emb[fit], levels=sid_cfg.levels, codebook_size=sid_cfg.codebook_size, epochs=sid_cfg.epochs,
                seed=sid_cfg.seed,
            )  # fmt: skip
        unique, stats = make_unique(assign_codes(quantizer, emb))
        sids = SemanticIds(order, unique)
        quantizer.save(quantizer_path(path))  # before the IDs: their file says the build is complete
    log.info(
        "semantic IDs (%s): %d items, %d levels + 1 for %d collision groups (largest %d)",
        source, len(sids), unique.shape[1] - 1, stats.collision_groups, stats.max_group,
    )  # fmt: skip
    sids.save(path)
    if waiting is not None:
        waiting.unlink(missing_ok=True)  # kept only for a build stopped before its end
    return sids


def _item_embeddings(
    sid_cfg: SemanticIdConfig, texts: list[str], pretrained: tuple[Any, Any], path: Path
) -> np.ndarray:
    """The embeddings of `texts`: those a stopped build left at `path` (`embeddings_path`), else computed and
    kept there until the IDs are written."""
    if path.is_file():
        try:
            kept = load_npz(path)["vectors"]
        except (DamagedFileError, KeyError):
            kept = None  # computed again below, and written over
        if kept is not None and kept.shape[0] == len(texts):
            log.info("semantic IDs: the %d item embeddings of a build stopped before its end", len(texts))
            return kept
    model, tok = _embedder(sid_cfg, pretrained)
    log.info("semantic IDs: embedding %d item texts", len(texts))
    with cost.part("item_embeddings"):
        emb = embed_texts(model, tok, texts)
    save_npz(path, {"vectors": emb})
    return emb


@dataclass(frozen=True)
class NewItemIds:
    """`SemanticIds` with an update's new items added, and what happened to those it could not name."""

    sids: SemanticIds
    added: list[str]
    unnamed: dict[str, list[str]]  # why -> items


def add_new_items(
    cfg: RunConfig,
    sids: SemanticIds,
    quantizer: Path,
    data: InteractionData,
    items: list[str],
    pretrained: tuple[Any, Any],
) -> NewItemIds:
    """`sids` with `items` (ones an update brings) encoded by `quantizer`, the RQ-VAE that built them
    (`quantizer_path`), from the items' text in `data` (`task.semantic_ids.text_fields`), as the IDs of a
    run's later stages are.

    A trained model has token rows only for the codes its items use, so each level takes the nearest code
    among those (`assign_codes(allowed=...)`), and the extra level a number up to the largest in use; the
    IDs of known items never change. A run whose IDs come with its data takes the new items' own IDs
    instead (`_given_ids`). Where the group of identical codes an item falls in has no free number left,
    it takes the nearest other code of the quantizer's last level whose group has one (`last_level_ranking`;
    an item the earlier levels place alike, told apart last). Items that cannot be named stay out, with the
    reason: no ID in the record of a run whose IDs come with its data, an ID with a token the model lacks,
    IDs built before evolora kept the quantizer, or no free number in any such group.
    """
    sid_cfg: SemanticIdConfig = cast(NextItemTaskConfig, cfg.task).semantic_ids
    items = [i for i in dict.fromkeys(items) if i not in sids]
    if not items:
        return NewItemIds(sids, [], {})
    if _id_source(sid_cfg, data) == "dataset":
        return _given_ids(sids, data, items)
    if not quantizer.is_file():
        return NewItemIds(
            sids, [], {"the run's semantic IDs were built before evolora kept their quantizer": items}
        )
    rqvae = RQVAE.load(quantizer)
    if rqvae.levels != sids.levels - 1:
        raise DataError(f"{quantizer}: a quantizer of {rqvae.levels} levels for IDs of {sids.levels}")
    model, tok = _embedder(sid_cfg, pretrained)
    log.info("semantic IDs: embedding %d new item texts", len(items))
    with cost.part("item_embeddings"):
        emb = embed_texts(model, tok, item_texts(data, items, sid_cfg.text_fields))
    allowed = sids.codes_in_use()[: rqvae.levels]
    codes = assign_codes(rqvae, emb, allowed=allowed)
    return _extended(sids, items, codes, {}, last_level_ranking(rqvae, emb, codes, allowed[-1]))


_NO_NUMBER = "their codes' group has no free number the model has a token for"
_NO_NUMBER_NEAR = (
    "neither their codes' group nor one with another of the last level's codes has a free number the model "
    "has a token for"
)


def _extended(
    sids: SemanticIds,
    items: list[str],
    codes: np.ndarray,
    unnamed: dict[str, list[str]],
    last_choices: np.ndarray | None = None,
) -> NewItemIds:
    extended = sids.extend(items, codes, max_suffix=int(sids.codes[:, -1].max()), last_choices=last_choices)
    left = [i for i in items if i not in extended]
    if left:
        unnamed = {**unnamed, _NO_NUMBER if last_choices is None else _NO_NUMBER_NEAR: left}
    return NewItemIds(extended, [i for i in items if i in extended], unnamed)


def _given_ids(sids: SemanticIds, data: InteractionData, items: list[str]) -> NewItemIds:
    """New items named by their own IDs (the data's `sid` field, as the run's items are), where the model
    has a token for every level of them; the level telling colliding items apart is added as for a run."""
    table = data.items.filter(pl.col("item_id").is_in(items))
    given = table.filter(pl.col("sid").is_not_null()) if "sid" in table.columns else table.clear()
    try:
        own = SemanticIds.from_strings(
            given["item_id"].to_list(), given["sid"].to_list() if given.height else []
        )
    except ValueError as e:
        raise DataError(f"the new items' records (--items): their semantic IDs (sid field): {e}") from None
    unnamed: dict[str, list[str]] = {}
    missing = [i for i in items if i not in own]
    if missing:
        unnamed["no semantic ID in their record (the run's IDs come with its data)"] = missing
    if not len(own):
        return NewItemIds(sids, [], unnamed)
    if own.levels != sids.levels - 1:
        raise DataError(
            f"the new items' records (--items): their semantic IDs have {own.levels} levels; the run's have "
            f"{sids.levels - 1} (before the level that tells colliding items apart)"
        )
    known = [set(used) for used in sids.codes_in_use()[: own.levels]]
    fits = np.array([all(c in known[level] for level, c in enumerate(row)) for row in own.codes.tolist()])
    outside = [i for i, ok in zip(own.item_ids, fits, strict=True) if not ok]
    if outside:
        unnamed["their semantic ID uses a token the model has no row for"] = outside
    inside = [i for i, ok in zip(own.item_ids, fits, strict=True) if ok]
    return _extended(sids, inside, own.codes[fits], unnamed)
