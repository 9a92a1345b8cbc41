"""Conventional recommenders in the continual protocol: learning, full ranking, growing ID tables, saving,
the stage loop end to end, and what they refuse."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from evolora.config import RunConfig
from evolora.continual.loop import StageLoop
from evolora.data.samples import draw
from evolora.errors import ConfigError, EvoloraError
from evolora.eval.report import build_report
from evolora.experiment import (
    Prepared,
    build_model_and_task,
    context_of,
    method_label,
    prepare_data,
    run_dir_of,
    run_experiment,
)
from evolora.models.conventional.backbone import ConventionalBackbone
from evolora.models.conventional.common import IdSpace
from tests.helpers import NEXT_ITEM_CYCLE, tiny_config, write_arrivals

CTR_MODELS = ["mf", "gru4rec", "sasrec", "two_tower", "din"]
RANKERS = ["mf", "gru4rec", "sasrec", "two_tower"]
SMALL = {
    "model.conventional.dim": 32,
    "model.conventional.dropout": 0.0,
    "train.samples_per_stage": "null",
    "train.valid_samples": "null",
    "train.batch_size": 64,
    "train.lr": 0.01,
    "eval.batch_size": 64,
}


@pytest.fixture(scope="module")
def arrivals_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_arrivals(tmp_path_factory.mktemp("arrivals"))


def config(data: Path, out: Path, model: str, **over: object) -> RunConfig:
    return tiny_config(data, out, **{**SMALL, "model.name": model, **over})


_PREPARED: dict[tuple, Prepared] = {}


def build(cfg: RunConfig):
    """(backbone, task, prepared), with the data prepared once per data setting."""
    key = (cfg.data.source, cfg.staging, cfg.task, cfg.protocol)
    if key not in _PREPARED:
        _PREPARED[key] = prepare_data(cfg)
    prepared = _PREPARED[key]
    lm, task = build_model_and_task(cfg, prepared)
    return lm, task, prepared


def fit(lm: ConventionalBackbone, task, rows: np.ndarray, epochs: int, lr: float = 0.01) -> None:
    torch.manual_seed(0)
    lm.reset_adapter("default", seed=0)
    lm.activate("default", trainable=True)
    opt = torch.optim.Adam(lm.trainable_parameters(), lr=lr)
    lm.model.train()
    for _ in range(epochs):
        for i in range(0, len(rows), 64):
            opt.zero_grad()
            task.loss(lm, rows[i : i + 64]).backward()
            opt.step()
    lm.model.eval()
    lm.activate("default", trainable=False)


# --------------------------------------------------------------------------------------------- learning


@pytest.mark.parametrize("model", CTR_MODELS)
def test_ctr_models_overfit(model: str, sunny_dir: Path, tmp_path: Path) -> None:
    lm, task, prepared = build(config(sunny_dir, tmp_path, model))
    task.before_stage(lm, 1)
    rows = prepared.pools[1].train
    fit(lm, task, rows, epochs=30)
    metrics = task.metrics(task.predict(lm, rows, 128), rows)
    assert metrics["auc"] > 0.97, metrics


@pytest.mark.parametrize("model", RANKERS)
def test_next_item_models_overfit(model: str, cycle_dir: Path, tmp_path: Path) -> None:
    lm, task, prepared = build(config(cycle_dir, tmp_path, model, **NEXT_ITEM_CYCLE))
    task.before_stage(lm, 1)
    rows = prepared.pools[1].train
    fit(lm, task, rows, epochs=60)
    ranked = task.predict(lm, rows, 128)
    assert task.metrics(ranked, rows)["hit@10"] > 0.9
    if model in ("gru4rec", "sasrec"):
        # Each user walks the items in a cycle: the last history item decides the next one.
        with_history = task.lengths[rows] > 0
        top1 = ranked.items[:, 0] == task.targets[rows]
        assert top1[with_history].mean() > 0.9


def test_pop_ranks_items_by_how_often_they_were_the_next_item(arrivals_dir: Path, tmp_path: Path) -> None:
    """Pop's softmax-trained biases order the items by training frequency, the same list for everyone."""
    over = {"task.name": "next_item", "task.history_len": 6, "task.template": "peso"}
    lm, task, prepared = build(config(arrivals_dir, tmp_path, "pop", **over))
    task.before_stage(lm, 1)
    rows = prepared.pools[1].train
    lm.reset_adapter("default", seed=0)
    lm.activate("default", trainable=True)
    opt = torch.optim.Adam(lm.trainable_parameters(), lr=0.05)
    lm.model.train()
    for _ in range(400):  # whole-pool steps: minibatch noise would blur counts that differ by one
        opt.zero_grad()
        task.loss(lm, rows).backward()
        opt.step()
    lm.model.eval()
    lm.activate("default", trainable=False)
    counts = np.bincount(task.targets[rows])
    ranked = task.predict(lm, prepared.pools[1].test, 128).items
    assert (ranked == ranked[0]).all()  # one list for every user
    top = ranked[0][: min(5, int((counts > 0).sum()))]
    # The listed items' counts never increase down the list, and the first is the most frequent item.
    assert counts[top[0]] == counts.max() and (np.diff(counts[top]) <= 0).all(), (top, counts[top])


# --------------------------------------------------------------------------------------------- ranking


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (EVOLORA_TEST_CUDA=1)")
@pytest.mark.parametrize("model", ["mf", "sasrec"])
def test_cuda_full_ranking_with_cold_items_equals_the_cpus(
    model: str, arrivals_dir: Path, tmp_path: Path
) -> None:
    """Evaluation mode gives the cold items one score by copying a column onto others: on CUDA that copy must
    not read the tensor it writes."""
    over = {"task.name": "next_item", "task.history_len": 6, "task.template": "peso"}
    lm, task, prepared = build(config(arrivals_dir, tmp_path, model, **over))
    task.before_stage(lm, 1)
    fit(lm, task, prepared.pools[1].train[:80], epochs=5)  # a few items trained, most cold
    on_gpu, gpu_task, _ = build(config(arrivals_dir, tmp_path, model, **over, **{"model.device": "cuda"}))
    gpu_task.before_stage(on_gpu, 1)
    on_gpu.model.load_state_dict(lm.model.state_dict())
    rows = prepared.pools[2].test[:20]
    assert bool(lm.model.items.cold(task.space.items_known(2))[1:].any())
    cpu, gpu = task.predict(lm, rows, batch_size=5), gpu_task.predict(on_gpu, rows, batch_size=5)
    np.testing.assert_array_equal(cpu.items, gpu.items)


@pytest.mark.parametrize("model", ["mf", "sasrec", "two_tower"])
def test_full_ranking_matches_brute_force(model: str, arrivals_dir: Path, tmp_path: Path) -> None:
    over = {"task.name": "next_item", "task.history_len": 6, "task.template": "peso"}
    lm, task, prepared = build(config(arrivals_dir, tmp_path, model, **over))
    task.before_stage(lm, 1)
    fit(lm, task, prepared.pools[1].train[:80], epochs=5)  # a few items trained, most cold
    n = task.space.items_known(2)
    assert n > lm.model.items.ids.size  # stage 2 brings items the tables have never held
    cold = lm.model.items.cold(n).numpy()
    test = prepared.pools[2].test
    cold_rows = test[cold[task.targets[test]]][:6]
    warm_rows = test[~cold[task.targets[test]]][:6]
    assert len(cold_rows) and len(warm_rows)
    # Rows of stage 1 share batches with stage-2 rows but rank only the items known by stage 1.
    rows = np.concatenate([cold_rows, prepared.pools[1].test[:3], warm_rows])
    ranked = task.predict(lm, rows, batch_size=5)

    hits, gains = {5: [], 10: []}, {5: [], 10: []}
    for q, row in enumerate(rows):
        cands = np.arange(1, task.space.items_known(int(task.stages[row])))
        # Every candidate scored on its own (user, history, candidate) through the CTR path.
        batch = task.batch(np.full(len(cands), row))
        batch.target = torch.as_tensor(cands)
        with torch.no_grad():
            s = lm.model.logits(batch).double().numpy()
        order = sorted(range(len(cands)), key=lambda j: (-s[j], cands[j]))
        # The same top 10 as scoring one by one, up to the order of items whose scores differ by rounding
        # alone (cold items tie exactly in one pass and by an ulp in the other on some CPUs' kernels).
        listed = ranked.items[q].tolist()
        assert len(set(listed)) == 10 and set(listed) <= set(cands.tolist())
        np.testing.assert_allclose(s[np.asarray(listed) - 1], s[order][:10], rtol=0, atol=1e-4)
        logp = s - (s.max() + np.log(np.exp(s - s.max()).sum()))
        np.testing.assert_allclose(ranked.scores[q], logp[order][:10], atol=1e-4)
        target = int(task.targets[row])
        if target in listed:
            rank = 1 + listed.index(target)
        else:  # below the list (or tied with its last item by rounding): no hit, no gain
            assert s[target - 1] <= s[order][9] + 1e-4
            rank = 11
        for k in (5, 10):
            hits[k].append(float(rank <= k))
            gains[k].append(1.0 / math.log2(rank + 1) if rank <= k else 0.0)
    metrics = task.metrics(ranked, rows)
    for k in (5, 10):
        assert metrics[f"hit@{k}"] == pytest.approx(np.mean(hits[k]))
        assert metrics[f"ndcg@{k}"] == pytest.approx(np.mean(gains[k]))


def test_cold_items_without_text_tie_and_go_by_index(arrivals_dir: Path, tmp_path: Path) -> None:
    over = {"task.name": "next_item", "task.history_len": 6, "task.template": "peso"}
    lm, task, prepared = build(config(arrivals_dir, tmp_path, "sasrec", **over))
    task.before_stage(lm, 1)
    fit(lm, task, prepared.pools[1].train[:80], epochs=5)
    rows = prepared.pools[2].test[:4]
    scores = task.candidate_scores(lm, rows)
    cold = lm.model.items.cold(scores.shape[1])
    cold[0] = False
    assert cold.sum() > 1
    assert (scores[:, cold] == scores[:, cold][:, :1]).all()  # exactly one score for all cold items


def test_cold_items_are_scored_by_their_text(arrivals_dir: Path, tmp_path: Path) -> None:
    """Labels follow the title ("Sunny" liked, "Rainy" not): with text features, items never trained on
    are still told apart; an ID-only model sees them all as the same average item."""
    aucs = {}
    for model in ("two_tower", "mf"):
        lm, task, prepared = build(config(arrivals_dir, tmp_path, model))
        task.before_stage(lm, 1)
        fit(lm, task, prepared.pools[1].train, epochs=20)
        task.before_stage(lm, 3)
        test = prepared.pools[3].test
        cold = lm.model.items.cold(task.space.items_known(3)).numpy()
        rows = test[cold[task.targets[test]]]
        assert len(rows) >= 20
        aucs[model] = task.metrics(task.predict(lm, rows, 64), rows)["auc"]
    assert aucs["two_tower"] > 0.9 and abs(aucs["mf"] - 0.5) < 0.15, aucs


@pytest.mark.parametrize("max_len", [50, 2])
def test_exclude_history_never_recommends_a_history_item(
    cycle_dir: Path, tmp_path: Path, max_len: int
) -> None:
    """The items left out are the prompt's (task.history_len), as for the LLM, also where the model reads
    fewer (model.conventional.max_len)."""
    over = {**NEXT_ITEM_CYCLE, "task.exclude_history": "true", "model.conventional.max_len": max_len}
    lm, task, prepared = build(config(cycle_dir, tmp_path, "gru4rec", **over))
    task.before_stage(lm, 1)
    fit(lm, task, prepared.pools[1].train, epochs=2)
    rows = prepared.pools[1].test
    ranked = task.predict(lm, rows, 16)
    index = task.space.item_index()
    hist = task.table.df["hist_items"]
    assert max(len(task.batch(rows[q : q + 1]).hist[0]) for q in range(len(rows))) <= max_len
    for q, r in enumerate(rows):
        history = {index[i] for i in hist[int(r)].to_list()[-8:]}
        assert history and not history & set(ranked.items[q].tolist())


def test_exclude_history_rated_leaves_out_every_item_the_user_rated_before(
    cycle_dir: Path, tmp_path: Path
) -> None:
    """`rated`: the items of the user's whole history before the row (stage 0's too, not only the prompt's
    `task.history_len`) are out of the ranking, every other candidate in, as a served recommendation
    leaves out what the user rated."""
    over = {**NEXT_ITEM_CYCLE, "task.exclude_history": "rated", "task.history_len": 2}
    lm, task, prepared = build(config(cycle_dir, tmp_path, "mf", **over))
    task.before_stage(lm, 1)
    rows = prepared.pools[1].test
    scores = task.candidate_scores(lm, rows)
    index = task.space.item_index()
    rated = task.table.rated_before(rows)
    assert max(len(set(r)) for r in rated) > 2  # more than the prompt holds
    n = scores.shape[1]
    for q, items in enumerate(rated):
        out = {index[i] for i in items} | {0}
        finite = set(torch.isfinite(scores[q]).nonzero().squeeze(1).tolist())
        assert finite == set(range(int(task.known[task.stages[rows[q]]]))) - out
        assert finite and max(finite) < n


@pytest.mark.parametrize("negatives_from", ["known", "unrated"])
def test_bpr_negatives_unrated_are_never_an_item_the_user_rated(
    negatives_from: str, cycle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MF's BPR negatives: `known` draws over every known item (on this 30-item log, often one the user
    rated by the row, or the target itself); `unrated` never does, as the BPR paper and RecBole draw."""
    over = {
        **NEXT_ITEM_CYCLE,
        "model.conventional.negatives_from": negatives_from,
        "model.conventional.negatives": 16,
    }
    lm, task, prepared = build(config(cycle_dir, tmp_path, "mf", **over))
    task.before_stage(lm, 1)
    rows = prepared.pools[1].train
    drawn: list[torch.Tensor] = []
    score_items = lm.model.score_items

    def spy(batch, items: torch.Tensor) -> torch.Tensor:
        drawn.append(items[:, 1:].clone())
        return score_items(batch, items)

    monkeypatch.setattr(lm.model, "score_items", spy)
    torch.manual_seed(0)
    assert torch.isfinite(task.loss(lm, rows))
    index = task.space.item_index()
    n = lm.model.items.ids.size
    rated = [{index[i] for i in r} | {int(task.targets[row])} for r, row in zip(
        task.table.rated_before(rows), rows, strict=True)]  # fmt: skip
    hits = sum(len(set(d.tolist()) & taken) for d, taken in zip(drawn[0], rated, strict=True))
    assert ((drawn[0] >= 1) & (drawn[0] < n)).all()
    if negatives_from == "unrated":
        assert hits == 0 and max(len(r) for r in rated) < n - 1
    else:
        assert hits > 0


@pytest.mark.parametrize("ties", ["first", "random"])
def test_ties_rank_a_constant_scorer_by_index_or_by_a_fixed_random_order(
    ties: str, arrivals_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Equal scores (cold items, an untrained model) go to the lowest index, the item that appeared first,
    or, with `task.ties: random`, a seeded random order that batching, rows of other stages in the batch and
    reruns do not change."""
    over = {"task.name": "next_item", "task.history_len": 6, "task.template": "peso", "task.ties": ties}
    lm, task, prepared = build(config(arrivals_dir, tmp_path, "pop", **over))
    task.before_stage(lm, 3)
    monkeypatch.setattr(lm.model, "rank_logits", lambda batch, n: torch.zeros(len(batch.target), n))
    rows = prepared.pools[2].test
    ranked = task.predict(lm, rows, 64)
    assert (ranked.items == ranked.items[:1]).all()  # one stage's rows: one candidate set, one order
    top = ranked.items[0].tolist()
    n = int(task.known[2])
    assert len(top) == 10 and set(top) <= set(range(1, n))
    if ties == "first":
        assert top == list(range(1, 11))
        return
    assert top != list(range(1, 11)) and top != sorted(top)
    assert (task.predict(lm, rows, 1).items == ranked.items).all()
    again = build(config(arrivals_dir, tmp_path, "pop", **over))[1]
    assert again.predict(lm, rows, 7).items.tolist() == ranked.items.tolist()
    # batched with a row of a later stage (more candidates, so more columns): the same order of ties
    later = prepared.pools[3].test[:1]
    assert int(task.known[3]) > n
    mixed = task.predict(lm, np.concatenate([rows[:1], later]), 64)
    assert mixed.items[0].tolist() == top


def test_a_history_item_past_the_candidates_leaves_every_candidate_in(
    arrivals_dir: Path, tmp_path: Path
) -> None:
    """A query asked of an earlier stage may hold an item of a later one (beyond the row's candidates): it
    was clamped onto the last candidate, which then vanished from the ranking without a word."""
    over = {
        "task.name": "next_item",
        "task.history_len": 6,
        "task.template": "peso",
        "task.exclude_history": "true",
    }
    lm, task, _ = build(config(arrivals_dir, tmp_path, "sasrec", **over))
    task.before_stage(lm, 1)
    row = int(np.flatnonzero(task.stages == 1)[0])
    n = int(task.known[1])
    assert task.space.n_items + 1 > n  # later stages bring items stage 1 does not know
    before = torch.isfinite(task.candidate_scores(lm, np.array([row])))[0]
    task._excluded[row, 0] = task.space.n_items  # the newest item, of a later stage
    after = torch.isfinite(task.candidate_scores(lm, np.array([row])))[0]
    assert after[n - 1] == before[n - 1] and torch.equal(after, before)


# --------------------------------------------------------------------------------------------- ID tables


def test_id_space_is_in_order_of_first_appearance(arrivals_dir: Path, tmp_path: Path) -> None:
    _, task, prepared = build(config(arrivals_dir, tmp_path, "mf"))
    space = task.space
    staged = prepared.staged
    for t in range(1, 4):
        upto = staged.filter(staged["stage"] <= t)
        users = {space.user_ids.index(u) for u in upto["user_id"].unique().to_list()}
        items = {space.item_ids.index(i) for i in upto["item_id"].unique().to_list()}
        assert users == set(range(1, space.users_known(t)))  # exactly a prefix of the indices
        assert items == set(range(1, space.items_known(t)))
    assert space.users_known(1) < space.users_known(3) and space.items_known(1) < space.items_known(3)
    assert IdSpace.from_staged(staged).item_ids == space.item_ids


@pytest.mark.parametrize("model", ["mf", "two_tower"])
def test_growing_keeps_old_rows_and_seeds_new_ones(model: str, arrivals_dir: Path, tmp_path: Path) -> None:
    lm, task, prepared = build(config(arrivals_dir, tmp_path, model))
    task.before_stage(lm, 1)
    fit(lm, task, prepared.pools[1].train, epochs=2)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    old = lm.table_sizes()
    lm.save_adapter(tmp_path / "s1")

    task.before_stage(lm, 2)
    space = task.space
    after = lm.model.state_dict()
    for name, t in lm.model.id_tables():
        n_old = old[name]
        assert t.size == (space.users_known(2) if t.kind == "user" else space.items_known(2)) > n_old
        assert torch.equal(after[f"{name}.weight"][:n_old], before[f"{name}.weight"])  # untouched
        assert torch.equal(after[f"{name}.seen"][:n_old], before[f"{name}.seen"])
        assert not after[f"{name}.seen"][n_old:].any()  # new rows are cold until trained
        if t.std > 0:
            assert after[f"{name}.weight"][n_old:].abs().sum() > 0
    for k, v in before.items():
        if not any(k.startswith(f"{name}.") for name in old):
            assert torch.equal(after[k], v), k
    # The same saved model grown the same way gets the same new rows.
    other, other_task, _ = build(config(arrivals_dir, tmp_path, model))
    other_task.before_stage(other, 1)
    other.load_adapter(tmp_path / "s1")
    other_task.before_stage(other, 2)
    for k, v in other.model.state_dict().items():
        assert torch.equal(v, after[k]), k


@pytest.mark.parametrize("model", [*CTR_MODELS, "pop"])
def test_reset_gives_the_same_weights_for_the_same_seed(model: str, sunny_dir: Path, tmp_path: Path) -> None:
    lm, task, prepared = build(config(sunny_dir, tmp_path, model, **{"model.conventional.item_text": "true"}))
    task.before_stage(lm, 1)
    lm.reset_adapter("default", seed=3)
    first = {k: v.clone() for k, v in lm.model.state_dict().items()}
    fit(lm, task, prepared.pools[1].train[:64], epochs=1)  # fit resets to seed 0, then trains
    lm.reset_adapter("default", seed=3)
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, first[k]), k
    assert not any(t.seen.any() for _, t in lm.model.id_tables())


def test_save_and_load_across_table_sizes(arrivals_dir: Path, tmp_path: Path) -> None:
    lm, task, prepared = build(config(arrivals_dir, tmp_path, "two_tower"))
    task.before_stage(lm, 2)
    fit(lm, task, np.concatenate([prepared.pools[1].train, prepared.pools[2].train]), epochs=2)
    lm.save_adapter(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "model.json").read_text())
    assert meta["model"] == "two_tower" and meta["tables"] == lm.table_sizes()
    saved = {k: v.clone() for k, v in lm.model.state_dict().items()}

    small, small_task, _ = build(config(arrivals_dir, tmp_path, "two_tower"))
    small_task.before_stage(small, 1)  # smaller tables than the saved ones: they grow to fit
    small.load_adapter(tmp_path / "saved")
    assert small.table_sizes() == lm.table_sizes()
    for k, v in small.model.state_dict().items():
        assert torch.equal(v, saved[k]), k

    big, big_task, _ = build(config(arrivals_dir, tmp_path, "two_tower"))
    big_task.before_stage(big, 3)  # larger tables: the saved rows, then the seeded growth
    big.load_adapter(tmp_path / "saved")
    task.before_stage(lm, 3)
    assert big.table_sizes() == lm.table_sizes()
    for k, v in big.model.state_dict().items():
        assert torch.equal(v, lm.model.state_dict()[k]), k

    wrong, _, _ = build(config(arrivals_dir, tmp_path, "mf"))
    with pytest.raises(EvoloraError, match="two_tower"):
        wrong.load_adapter(tmp_path / "saved")


def test_din_user_representation_shape(sunny_dir: Path, tmp_path: Path) -> None:
    lm, task, prepared = build(config(sunny_dir, tmp_path, "din", **{"model.conventional.mlp": "[32, 16]"}))
    task.before_stage(lm, 1)
    batch = task.batch(prepared.pools[1].train[:7])
    with torch.no_grad():
        z = lm.model.user_representation(batch)
        logits = lm.model.logits(batch)
    assert z.shape == (7, 16) and logits.shape == (7,)


# --------------------------------------------------------------------------------------------- the loop


def test_run_experiment_end_to_end(sunny_dir: Path, tmp_path: Path) -> None:
    cfg = config(sunny_dir, tmp_path, "sasrec", **{"train.epochs": 3})
    frozen, finetune = run_experiment(cfg)
    assert [frozen["method"], finetune["method"]] == ["sasrec-frozen", "sasrec-finetune"]
    for r in (frozen, finetune):
        on_disk = json.loads((run_dir_of(cfg, r["method"], 0) / "results.json").read_text())
        assert on_disk == json.loads(json.dumps(r))
        assert on_disk["task"] == "ctr" and on_disk["model"] == "sasrec" and on_disk["complete"]
        assert on_disk["strategy"] in ("frozen", "finetune")
        assert [s["eval_stage"] for s in on_disk["stages"]] == [2, 3]
        for s in on_disk["stages"]:
            assert set(s["metrics"]) == {"auc", "logloss"} and s["n_eval"] == 40
            assert "active" in s["by_user_kind"]
        assert set(on_disk["summary"]["mean"]) == {"auc", "logloss"}
    assert frozen["stages"][0]["metrics"]["auc"] > 0.8
    assert finetune["stages"][0]["jobs"][0]["reused_shared_result"] is True
    assert frozen["stages"][1]["trained"] is False and finetune["stages"][1]["trained"] is True
    stage = run_dir_of(cfg, "sasrec-finetune", 0) / "stage-2"
    assert (stage / "trained" / "adapters" / "default" / "model.safetensors").is_file()
    # Evaluated on exactly the rows an LLM run of the same settings is evaluated on.
    prepared = prepare_data(cfg)
    with np.load(stage / "predictions.npz") as z:
        assert np.array_equal(z["rows"], draw(prepared.pools[3].test, 40, cfg.eval.seed, 3, salt=2))
    report, _ = build_report([Path(cfg.output_dir) / cfg.name])
    assert "sasrec-finetune" in report and "sasrec-frozen" in report


def test_next_item_run_with_mf(cycle_dir: Path, tmp_path: Path) -> None:
    over = {"train.epochs": 2, "strategies": "[retrain]"}
    cfg = config(cycle_dir, tmp_path, "mf", **NEXT_ITEM_CYCLE, **over)
    (result,) = run_experiment(cfg)
    assert result["method"] == "mf-retrain" and result["complete"]
    assert [s["eval_stage"] for s in result["stages"]] == [1, 2, 3]
    for s in result["stages"]:
        assert set(s["metrics"]) == {"hit@5", "hit@10", "ndcg@5", "ndcg@10"}
        assert 0 <= s["metrics"]["ndcg@10"] <= s["metrics"]["hit@10"] <= 1
    with np.load(run_dir_of(cfg, "mf-retrain", 0) / "stage-2" / "predictions.npz") as z:
        assert z["items"].shape == (len(z["rows"]), 10) and (z["items"] >= 1).all()


class Interrupt(Exception):
    pass


def test_resume_after_training_finished_but_before_the_job_was_recorded(
    arrivals_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    over = {"train.epochs": 3, "strategies": "[finetune]"}
    reference = run_experiment(config(arrivals_dir, tmp_path / "ref", "gru4rec", **over))[0]

    cfg = config(arrivals_dir, tmp_path / "run", "gru4rec", **over)
    real = StageLoop._finish_job

    def dying(self, ctx, *a, **k):
        if ctx.stage == 2:
            raise Interrupt
        return real(self, ctx, *a, **k)

    monkeypatch.setattr(StageLoop, "_finish_job", dying)
    with pytest.raises(Interrupt):
        run_experiment(cfg)
    # Every epoch is in the checkpoint, including which ID rows were trained.
    checkpoints = run_dir_of(cfg, "gru4rec-finetune", 0) / "stage-2" / "checkpoints"
    assert (checkpoints / "default.safetensors").is_file()
    monkeypatch.setattr(StageLoop, "_finish_job", real)
    resumed = run_experiment(cfg)[0]
    assert resumed["complete"]
    for a, b in zip(resumed["stages"], reference["stages"], strict=True):
        assert a["metrics"] == pytest.approx(b["metrics"], abs=1e-9)


# --------------------------------------------------------------------------------------------- refusals


def test_lora_strategies_and_din_ranking_are_refused(sunny_dir: Path, tmp_path: Path) -> None:
    cfg = config(sunny_dir, tmp_path, "sasrec", strategies="[finetune, {name: peso, lam: 1.0}]")
    named = (
        r"'peso' \(peso\) needs LoRA adapters .* 'sasrec'; conventional models run frozen, finetune, retrain"
    )
    with pytest.raises(ConfigError, match=named):
        run_experiment(cfg)
    assert not (tmp_path / cfg.name).exists()  # refused before any work
    with pytest.raises(ConfigError, match="din"):
        run_experiment(
            config(sunny_dir, tmp_path, "din", **{"task.name": "next_item", "task.template": "peso"})
        )
    with pytest.raises(ConfigError, match=r"heads=3 must divide model\.conventional\.dim"):
        run_experiment(config(sunny_dir, tmp_path / "heads", "sasrec", **{"model.conventional.heads": 3}))
    assert not (tmp_path / "heads").exists()  # refused before any work


def test_labels_and_experiment_keys(sunny_dir: Path, tmp_path: Path) -> None:
    conv = config(sunny_dir, tmp_path, "gru4rec", strategies="[frozen, {name: finetune, label: ft}]")
    assert [method_label(conv, s) for s in conv.strategies] == ["gru4rec-frozen", "ft"]
    llm = tiny_config(sunny_dir, tmp_path)
    assert [method_label(llm, s) for s in llm.strategies] == ["frozen", "finetune"]
    # LLM experiments keep their keys: the conventional section stays out of them, and vice versa.
    assert "conventional" not in context_of(llm)["model"] and "lora" in context_of(llm)["model"]
    assert "conventional" in context_of(conv)["model"] and "lora" not in context_of(conv)["model"]


def test_conventional_rankers_refuse_the_whole_catalogue(cycle_dir: Path, tmp_path: Path) -> None:
    cfg = config(cycle_dir, tmp_path, "gru4rec", **NEXT_ITEM_CYCLE, **{"task.candidates": "catalogue"})
    with pytest.raises(ConfigError, match="candidates: seen"):
        build(cfg)
