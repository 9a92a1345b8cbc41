"""Semantic IDs: k-means, the RQ-VAE, uniqueness, the SemanticIds table and text embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from evolora.models.rqvae import RQVAE, assign_codes, kmeans, last_level_ranking, train_rqvae
from evolora.models.semantic_ids import SemanticIds, collision_stats, embed_texts, make_unique
from evolora.models.tiny import build_tiny_llama

PESO_INDEX = (
    Path(__file__).resolve().parents[1]
    / "../shared/data/amazon-cds-peso/CDs_and_Vinyl_cl_0.6_0_5_3_0.index.epoch20000_edim32_beta0.0.json"
)
SMALL = {"hidden": (64, 32), "code_dim": 8}  # a small network keeps the tests fast


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray]:
    """300 points from 8 well-separated gaussian clusters in 32-d, and their cluster labels."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(8, 32)) * 6
    labels = rng.integers(0, 8, size=300)
    return (centers[labels] + rng.normal(size=(300, 32))).astype(np.float32), labels


@pytest.fixture(scope="module")
def trained(clustered: tuple[np.ndarray, np.ndarray]) -> RQVAE:
    return train_rqvae(clustered[0], levels=3, codebook_size=16, epochs=150, progress=False, **SMALL)


def test_kmeans_assigns_nearest_centroid() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=gen)
    centroids, labels = kmeans(x, 9, generator=gen)
    assert centroids.shape == (9, 6)
    assert torch.equal(labels, torch.cdist(x, centroids).argmin(1))
    assert len(labels.unique()) == 9  # no empty cluster
    # More centroids than distinct points still works (the extra ones repeat points).
    few, few_labels = kmeans(x[:3], 5, generator=gen)
    assert few.shape == (5, 6) and torch.allclose(few[few_labels], x[:3])


def test_rqvae_learns_clusters(trained: RQVAE, clustered: tuple[np.ndarray, np.ndarray]) -> None:
    x, labels = clustered
    model = trained
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    assert out.codes.shape == (300, 3)
    recon_mse = float(((out.recon.numpy() - x) ** 2).mean())
    mean_mse = float(((x - x.mean(0)) ** 2).mean())
    assert recon_mse < 0.3 * mean_mse, (recon_mse, mean_mse)

    codes = assign_codes(model, x)
    assert np.array_equal(codes, out.codes.numpy())
    first = codes[:, 0]
    same_cluster = labels[:, None] == labels[None, :]
    same_code = first[:, None] == first[None, :]
    off_diag = ~np.eye(len(x), dtype=bool)
    p_given_same = same_code[same_cluster & off_diag].mean()
    p_given_other = same_code[~same_cluster].mean()
    p_chance = same_code[off_diag].mean()
    assert p_given_same > 4 * p_chance, (p_given_same, p_chance)
    assert p_given_other < 0.02, p_given_other  # a level-1 code never mixes clusters (almost)


def test_rqvae_is_deterministic(tmp_path: Path, clustered: tuple[np.ndarray, np.ndarray]) -> None:
    x = clustered[0][:120]
    kw = {"levels": 2, "codebook_size": 8, "epochs": 5, "progress": False, **SMALL}
    a, b = train_rqvae(x, seed=3, **kw), train_rqvae(x, seed=3, **kw)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    c = train_rqvae(x, seed=4, **kw)
    assert not torch.equal(a.codebooks, c.codebooks)
    a.save(tmp_path / "rq.pt")
    assert np.array_equal(assign_codes(RQVAE.load(tmp_path / "rq.pt"), x), assign_codes(a, x))


def test_codes_within_allowed_ones_are_the_nearest_allowed(
    trained: RQVAE, clustered: tuple[np.ndarray, np.ndarray]
) -> None:
    """An update's new items take only codes the model has tokens for: with every code allowed the codes
    are the plain ones; with some forbidden, each level takes the nearest allowed code of its residual."""
    x = clustered[0]
    plain = assign_codes(trained, x)
    everything = [range(trained.codebook_size)] * trained.levels
    assert np.array_equal(assign_codes(trained, x, allowed=everything), plain)
    used_first = sorted(set(plain[:, 0].tolist()))
    allowed = [set(used_first[: len(used_first) // 2]), set(range(16)), {0, 3}]
    codes = assign_codes(trained, x, allowed=allowed)
    assert set(codes[:, 0].tolist()) <= allowed[0] and set(codes[:, 2].tolist()) <= {0, 3}
    kept = np.isin(plain[:, 0], list(allowed[0]))
    assert np.array_equal(codes[kept, :2], plain[kept, :2])  # an allowed nearest code stays the choice
    with torch.no_grad():  # the nearest allowed code at level 1, by hand
        z = trained.encode(torch.as_tensor(x))
        d = ((z[:, None, :] - trained.codebooks[0][None]) ** 2).sum(-1)
        d[:, [c for c in range(trained.codebook_size) if c not in allowed[0]]] = float("inf")
    assert np.array_equal(codes[:, 0], d.argmin(1).numpy())
    with pytest.raises(ValueError, match="at least one allowed code"):
        assign_codes(trained, x, allowed=[set(), {0}, {0}])


def test_extend_within_the_numbers_a_model_knows() -> None:
    sids = SemanticIds.from_codes(["i1", "i2", "i3"], np.array([[1, 2], [1, 2], [4, 4]]))  # suffixes 0, 1
    grown = sids.extend(["n1", "n2", "n3", "n4"], np.array([[4, 4], [1, 2], [6, 6], [6, 6]]), max_suffix=1)
    assert grown.item_ids == ["i1", "i2", "i3", "n1", "n3", "n4"]  # n2 would need <c_2>: left out
    assert [grown.sid(i) for i in ("n1", "n3", "n4")] == [
        "<a_4><b_4><c_1>",
        "<a_6><b_6><c_0>",
        "<a_6><b_6><c_1>",
    ]
    assert sids.extend(["n2"], np.array([[1, 2]]), max_suffix=1).item_ids == sids.item_ids


def test_a_full_group_sends_a_new_item_to_the_nearest_last_code_with_a_free_number() -> None:
    """An update's item whose group of identical codes had used every number the model has a token for
    was dropped, and so were its rows in every later batch (its codes are fixed by its text): it takes the
    next of its last level's codes, nearest first, whose group has a free number."""
    sids = SemanticIds.from_codes(["i1", "i2", "i3"], np.array([[1, 2], [1, 2], [1, 4]]))  # suffixes 0, 1; 0
    choices = np.array([[2, 4, 3], [2, 4, 3], [2, 4, 3]])  # nearest first, the item's own code first
    grown = sids.extend(["n1", "n2", "n3"], np.array([[1, 2]] * 3), max_suffix=1, last_choices=choices)
    assert [grown.sid(i) for i in ("n1", "n2", "n3")] == [
        "<a_1><b_4><c_1>",
        "<a_1><b_3><c_0>",
        "<a_1><b_3><c_1>",
    ]
    full = grown.extend(["n4"], np.array([[1, 2]]), max_suffix=1, last_choices=choices[:1])
    assert full.item_ids == grown.item_ids  # every group full: left out, as without choices
    assert sids.extend(["n1"], np.array([[1, 2]]), max_suffix=1).item_ids == sids.item_ids


def test_last_level_ranking_orders_the_allowed_last_codes_by_distance(
    trained: RQVAE, clustered: tuple[np.ndarray, np.ndarray]
) -> None:
    x = clustered[0]
    allowed = [range(trained.codebook_size)] * (trained.levels - 1) + [{0, 3, 5, 9}]
    codes = assign_codes(trained, x, allowed=allowed)
    ranked = last_level_ranking(trained, x, codes, allowed[-1])
    assert ranked.shape == (len(x), 4) and np.array_equal(ranked[:, 0], codes[:, -1])  # its own code first
    assert all(sorted(row) == [0, 3, 5, 9] for row in ranked.tolist())  # the allowed codes, each once
    with torch.no_grad():  # the last level's residual, by hand
        residual = trained.encode(torch.as_tensor(x))
        for level in range(trained.levels - 1):
            residual = residual - trained.codebooks[level][torch.as_tensor(codes[:, level])]
        d = ((residual[:, None, :] - trained.codebooks[-1][None]) ** 2).sum(-1).numpy()
    assert np.all(np.diff(np.take_along_axis(d, ranked, 1), axis=1) >= -1e-5)  # nearest first (rounding)


def test_make_unique() -> None:
    codes = np.array([[1, 2], [1, 2], [3, 4], [1, 2], [3, 5], [3, 4]])
    unique, stats = make_unique(codes)
    assert unique[:, -1].tolist() == [0, 1, 0, 2, 0, 1]
    assert np.array_equal(unique[:, :2], codes)
    assert len(np.unique(unique, axis=0)) == len(codes)
    assert (
        stats.items,
        stats.unique_codes,
        stats.collision_groups,
        stats.colliding_items,
        stats.max_group,
    ) == (
        6,
        3,
        2,
        5,
        3,
    )
    rng = np.random.default_rng(1)
    many = rng.integers(0, 3, size=(400, 3))
    unique, stats = make_unique(many)
    assert len(np.unique(unique, axis=0)) == 400
    for row in np.unique(many, axis=0):  # every group is numbered 0..k-1 in item order
        suffix = unique[(many == row).all(1), -1]
        assert suffix.tolist() == list(range(len(suffix)))
    assert collision_stats(unique).max_group == 1


def test_semantic_ids_roundtrip(tmp_path: Path) -> None:
    sids = SemanticIds.from_strings(
        ["7", "8", "9"], ["<a_51><b_218><c_33><d_0>", "<a_51><b_3><c_33><d_0>", "<a_2><b_3><c_1><d_9>"]
    )
    assert sids.levels == 4 and sids.codes[0].tolist() == [51, 218, 33, 0]
    assert sids.tokens("8") == ["<a_51>", "<b_3>", "<c_33>", "<d_0>"]
    assert sids.sid("9") == "<a_2><b_3><c_1><d_9>"
    assert sids.all_tokens() == ["<a_2>", "<a_51>", "<b_3>", "<b_218>", "<c_1>", "<c_33>", "<d_0>", "<d_9>"]
    assert sids.collisions().collision_groups == 0
    sids.save(tmp_path / "ids.json")
    assert json.loads((tmp_path / "ids.json").read_text())["7"] == ["<a_51>", "<b_218>", "<c_33>", "<d_0>"]
    back = SemanticIds.load(tmp_path / "ids.json")
    assert back.item_ids == sids.item_ids and np.array_equal(back.codes, sids.codes)
    for bad in ("<a_1><c_2>", "<a_1>x", "", "<b_1><a_2>"):
        with pytest.raises(ValueError, match="is not a semantic ID"):
            SemanticIds.from_strings(["1"], [bad])
    with pytest.raises(ValueError, match="different numbers of levels"):
        SemanticIds.from_strings(["1", "2"], ["<a_1><b_2>", "<a_1>"])


def test_extend_keeps_ids_unique() -> None:
    sids = SemanticIds.from_codes(["i1", "i2", "i3"], np.array([[1, 2], [1, 2], [4, 4]]))
    assert sids.sid("i2") == "<a_1><b_2><c_1>"
    grown = sids.extend(["n1", "n2", "n3"], np.array([[1, 2], [5, 5], [5, 5]]))
    assert [grown.sid(i) for i in ("n1", "n2", "n3")] == [
        "<a_1><b_2><c_2>",
        "<a_5><b_5><c_0>",
        "<a_5><b_5><c_1>",
    ]
    assert [grown.sid(i) for i in sids.item_ids] == [sids.sid(i) for i in sids.item_ids]  # old IDs unchanged
    assert grown.collisions().max_group == 1 and len(sids) == 3
    full = grown.extend(["f"], np.array([[9, 9, 0]]))  # complete codes are taken as they are
    assert full.sid("f") == "<a_9><b_9><c_0>"
    with pytest.raises(ValueError, match="already have semantic IDs"):
        grown.extend(["i1"], np.array([[7, 7]]))
    with pytest.raises(ValueError, match="expected 2 or 3"):
        grown.extend(["x"], np.array([[7]]))


@pytest.mark.skipif(not PESO_INDEX.is_file(), reason="PESO's CDs index is not available here")
def test_peso_index() -> None:
    sids = SemanticIds.load(PESO_INDEX)
    assert len(sids) == 39191 and sids.levels == 4
    assert sids.sid("0") == "<a_51><b_218><c_33><d_0>"
    assert sids.collisions().collision_groups == 546  # left unresolved by the release (spec §2.1)
    assert SemanticIds.from_codes(sids.item_ids, sids.codes).collisions().max_group == 1


def test_embed_texts_tiny_model() -> None:
    model, tok = build_tiny_llama()
    tok.padding_side = "left"  # ignored: embed_texts pads on the right itself
    texts = [
        "Toy Story",
        "a much longer text about the albums and songs the user likes",
        "Toy Story",
        "Fargo",
    ]
    one = embed_texts(model, tok, texts, batch_size=1)
    batched = embed_texts(model, tok, texts, batch_size=4)
    assert one.shape == (4, model.config.hidden_size) and one.dtype == np.float32
    assert np.isfinite(one).all()
    np.testing.assert_allclose(one, batched, atol=1e-5)
    np.testing.assert_allclose(batched[0], batched[2], atol=1e-6)
    assert not np.allclose(batched[0], batched[3])
    with pytest.raises(ValueError, match="has no tokens"):
        embed_texts(model, tok, [""])


def test_bad_semantic_ids_and_text_fields_of_the_data_are_one_line_errors(tmp_path: Path) -> None:
    """IDs the data ships that do not parse, or of uneven depth, are the data's problem (a DataError naming
    it, not a ValueError traceback); text fields the items lack would embed every item as 'item <id>'."""
    from evolora.errors import ConfigError, DataError
    from evolora.experiment import build_model_and_task, prepare_data
    from tests.helpers import NEXT_ITEM_CYCLE, tiny_config, write_peso_cycle

    folder = write_peso_cycle(tmp_path / "cycle")
    index = next(folder.glob("*.index.*.json"))
    ids = json.loads(index.read_text())
    ids["0"] = ["<a_0>"]  # one level where the others have two
    index.write_text(json.dumps(ids))
    cfg = tiny_config(folder, tmp_path / "runs", **NEXT_ITEM_CYCLE)
    with pytest.raises(DataError, match=r"semantic IDs .*different numbers of levels: \[1, 2\]"):
        build_model_and_task(cfg, prepare_data(cfg))
    cfg = tiny_config(
        folder, tmp_path / "rq", **{**NEXT_ITEM_CYCLE, "task.semantic_ids.source": "rqvae",
                                    "task.semantic_ids.text_fields": "[titel]"}
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"text_fields \['titel'\]: the items have none of these fields"):
        build_model_and_task(cfg, prepare_data(cfg))
