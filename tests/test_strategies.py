"""The mathematics of each continual strategy, on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from evolora.continual.base import MAIN
from evolora.continual.inflora import designed_a, update_basis
from evolora.continual.lsat import LONG, choose_weight
from evolora.continual.regularizers import ProximalRegularizer, orthogonality_loss
from evolora.experiment import run_dir_of, run_experiment
from evolora.models.bank import AdapterBank
from evolora.models.llm import LoraLM
from tests.helpers import tiny_config, tiny_model


@pytest.fixture
def lm() -> LoraLM:
    lm = LoraLM.from_config(tiny_model())
    with torch.no_grad():
        for _, a, b in lm.lora_pairs():
            a.normal_(0, 0.1)
            b.normal_(0, 0.1)
    return lm


def perturb(lm: LoraLM, scale: float = 0.05, adapter: str = MAIN) -> None:
    with torch.no_grad():
        for _, a, b in lm.lora_pairs(adapter):
            a.add_(scale * torch.randn_like(a))
            b.add_(scale * torch.randn_like(b))


def distance(lm: LoraLM, anchor: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    return sum(
        ((a - a0).norm() ** 2 + (b - b0).norm() ** 2).item()
        for (_, a, b), (a0, b0) in zip(lm.lora_pairs(), anchor, strict=True)
    )


# ---------------------------------------------------------------------------------------------- PESO
@pytest.mark.parametrize("penalty", ["kl", "l2", "l2_norm"])
def test_proximal_term_is_zero_at_anchor_and_pulls_toward_it(lm: LoraLM, penalty: str) -> None:
    torch.manual_seed(0)
    reg = ProximalRegularizer(penalty)
    reg.set_anchor(lm.lora_pairs())
    assert reg(lm.lora_pairs()).item() == pytest.approx(0.0, abs=1e-7)
    perturb(lm)
    lm.activate(MAIN, trainable=True)
    params = lm.trainable_parameters()
    before = distance(lm, reg.anchor)
    term = reg(lm.lora_pairs()).item()
    assert term > 0
    opt = torch.optim.SGD(params, lr=0.5 if penalty != "kl" else 50.0)
    for _ in range(20):
        opt.zero_grad()
        reg(lm.lora_pairs()).backward()
        opt.step()
    assert distance(lm, reg.anchor) < before
    assert reg(lm.lora_pairs()).item() < term


def test_kl_matches_formula_and_mean_reduction(lm: LoraLM) -> None:
    torch.manual_seed(0)
    reg = ProximalRegularizer("kl", "sum")
    reg.set_anchor(lm.lora_pairs())
    perturb(lm, scale=0.5)  # large enough for the KL to stand far above fp32 rounding
    pairs = lm.lora_pairs()
    expected = 0.0
    for (_, a, b), (a0, b0) in zip(pairs, reg.anchor, strict=True):
        for v, v0 in ((a, a0), (b, b0)):
            p = torch.softmax(v.detach().flatten().double(), 0)
            q = torch.softmax(v0.flatten().double(), 0)
            expected += float((p * (p / q).log()).sum())
    assert reg(pairs).item() == pytest.approx(expected, rel=1e-3)
    mean = ProximalRegularizer("kl", "mean")
    mean.anchor = reg.anchor
    assert mean(pairs).item() == pytest.approx(expected / len(pairs), rel=1e-3)


def test_kl_term_is_fp32_for_bf16_weights() -> None:
    reg = ProximalRegularizer("kl")
    a = torch.randn(8, 64).bfloat16()
    reg.anchor = [(a.float(), a.float())]
    moved = (a.float() * 1.001).bfloat16()
    term = reg([("m", moved, moved)])
    assert term.dtype == torch.float32


def test_kl_term_resolves_changes_too_small_for_fp32() -> None:
    """A 0.1% change of a 4608-entry group has KL ~1e-9, below fp32's rounding of log-probabilities."""
    torch.manual_seed(0)
    a = torch.nn.Parameter((torch.rand(8, 576) * 2 - 1) * 0.042)
    b = torch.nn.Parameter(torch.zeros(576, 8))
    reg = ProximalRegularizer("kl")
    reg.set_anchor([("m", a, b)])
    with torch.no_grad():
        a.add_(torch.randn_like(a) * 0.042e-3)
    term = reg([("m", a, b)])
    p = np.exp(a.detach().double().numpy().ravel())
    p /= p.sum()
    q = np.exp(reg.anchor[0][0].numpy().ravel())
    q /= q.sum()
    expected = float(np.sum(p * np.log(p / q)))
    assert 0 < expected < 1e-8
    assert term.item() == pytest.approx(expected, rel=1e-3)
    term.backward()
    assert a.grad is not None and a.grad.dtype == torch.float32 and torch.isfinite(a.grad).all()


# ---------------------------------------------------------------------------------------------- LSAT
@pytest.mark.parametrize("mode", ["delta", "factors"])
def test_fused_adapter_equals_manual_merge(lm: LoraLM, mode: str) -> None:
    from evolora.config import StrategySpec
    from evolora.continual import Env, build_strategy

    cfg = tiny_config(Path("."), Path("."))
    strategy = build_strategy(StrategySpec(name="lsat", fusion=mode), Env(lm, None, cfg), seed=0)  # type: ignore[arg-type]
    strategy.setup()
    with torch.no_grad():
        for _, a, b in lm.lora_pairs(LONG):
            a.normal_(0, 0.1)
            b.normal_(0, 0.1)
    w = 0.3
    strategy.build_fused(w)
    long = {n: (a, b) for n, a, b in lm.lora_pairs(LONG)}
    short = {n: (a, b) for n, a, b in lm.lora_pairs(MAIN)}
    s = lm.lora.alpha / lm.lora.r
    layers = dict(lm.lora_layers())
    for name, a_f, b_f in lm.lora_pairs("fused"):
        fused = layers[name].scaling["fused"] * b_f @ a_f
        (a_l, b_l), (a_s, b_s) = long[name], short[name]
        if mode == "delta":
            expected = w * s * b_l @ a_l + (1 - w) * s * b_s @ a_s
        else:
            expected = s * (w * b_l + (1 - w) * b_s) @ (w * a_l + (1 - w) * a_s)
        torch.testing.assert_close(fused, expected, atol=1e-6, rtol=1e-5)

    if mode == "delta":  # the whole model: fused adapter == base weights with both updates merged by hand
        ids = torch.tensor([[3, 50, 7, 90, 12]])
        lm.activate("fused", trainable=False)
        with torch.no_grad():
            out = lm.model(input_ids=ids).logits
            base = lm.base
            for name, module in layers.items():
                (a_l, b_l), (a_s, b_s) = long[name], short[name]
                module.base_layer.weight += w * s * b_l @ a_l + (1 - w) * s * b_s @ a_s
            with lm.model.disable_adapter():
                merged = base(input_ids=ids).logits
        torch.testing.assert_close(out, merged, atol=1e-5, rtol=1e-4)


def test_options_the_others_leave_unread_are_said(caplog: pytest.LogCaptureFixture) -> None:
    """LSAT's fusion is read only with inference: fusion, its long_stages only with long_mode: fixed: given
    otherwise they ran without a word."""
    from evolora.config import StrategySpec
    from evolora.continual import check_strategy_specs

    specs = [
        StrategySpec(name="lsat", fusion="delta"),
        StrategySpec(name="lsat", label="full", long_mode="full", long_stages=7),
        StrategySpec(name="lsat", label="ta", inference="fusion", fusion="delta", long_stages=2),
    ]
    with caplog.at_level("WARNING", logger="evolora"):
        check_strategy_specs(specs)
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "strategy 'lsat': fusion is read only with inference: fusion; ignored",
        "strategy 'full': long_stages is read only with long_mode: fixed; ignored",
    ]


def test_ensemble_weight_picks_the_best_validation_alpha() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    signal = labels + rng.normal(0, 1.0, 400)
    # Two noisy views of the same signal: their best mix is in the interior, near their noise ratio.
    long = signal + rng.normal(0, 1.0, 400)
    short = signal + rng.normal(0, 2.0, 400)
    from evolora.eval.metrics import auc

    grid = [round(0.1 * i, 1) for i in range(11)]
    best, curve = choose_weight(long, short, grid, lambda w, lo, sh: auc(labels, w * lo + (1 - w) * sh))
    assert curve[best] == max(curve.values())
    assert 0 < best < 1
    tie, _ = choose_weight(None, None, [0.0, 0.5, 1.0], lambda w, lo, sh: 1.0)
    assert tie == 0.0


# ---------------------------------------------------------------------------------------------- cumulative
def test_bank_adds_frozen_normalised_updates_and_never_trains_them(lm: LoraLM) -> None:
    ids = torch.tensor([[3, 50, 7, 90, 12]])
    bank = AdapterBank(lm, MAIN, normalize="factors", learnable=False)
    frozen = {n: (a.detach().clone(), b.detach().clone()) for n, a, b in lm.lora_pairs()}
    bank.push()
    layers = dict(lm.lora_layers())
    name = next(iter(frozen))
    module = layers[name]
    x = torch.randn(2, 4, module.in_features)
    a0, b0 = frozen[name]
    s = module.scaling[MAIN]
    with torch.no_grad():
        expected = (
            module.base_layer(x) + s * x @ a0.T @ b0.T + s * x @ (a0 / a0.norm()).T @ (b0 / b0.norm()).T
        )
        torch.testing.assert_close(module(x), expected, atol=1e-6, rtol=1e-5)

    lm.activate(MAIN, trainable=True)
    lm.model.train()
    lm.model(input_ids=ids, labels=ids).loss.backward()
    for bank_part in bank.banks.values():
        assert not bank_part.a.requires_grad and not bank_part.b.requires_grad
        assert bank_part.a.grad is None and bank_part.b.grad is None
        assert not bank_part.magnitudes.requires_grad
    assert bank.magnitude_parameters() == []
    bank.push()
    bank.keep_latest()
    assert bank.size == 1 and all(len(bank.past_factors(n)) == 1 for n in bank.banks)
    bank.remove()
    lm.model.eval()  # no LoRA dropout
    with torch.no_grad():
        torch.testing.assert_close(
            module(x), module.base_layer(x) + s * x @ a0.T @ b0.T, atol=1e-6, rtol=1e-5
        )


def test_product_normalisation_gives_past_updates_of_norm_one(lm: LoraLM) -> None:
    """SD-LoRA's paper: B_i A_i / ||B_i A_i||_F, the update itself a unit direction (the default of `sdlora`;
    `factors`, A and B each of norm 1, as its code and PESO do, leaves the update's norm below 1)."""
    from evolora.config import StrategySpec
    from evolora.continual import Env, build_strategy

    before = {n: (b @ a).detach() for n, a, b in lm.lora_pairs(MAIN)}
    norms = {}
    for mode in ("product", "factors"):
        bank = AdapterBank(lm, MAIN, normalize=mode)
        bank.push()
        norms[mode] = [float((b @ a).norm()) for n in bank.banks for a, b in bank.past_factors(n)]
        for n in bank.banks:  # the same direction, scaled
            (a, b), *_ = bank.past_factors(n)
            torch.testing.assert_close(b @ a, before[n] / before[n].norm() * (b @ a).norm())
        bank.remove()
    assert norms["product"] == pytest.approx([1.0] * len(norms["product"]), rel=1e-5)
    assert max(norms["factors"]) < 0.99
    with torch.no_grad():  # an update that stayed zero has no direction: it is kept as zero, not blown up
        for _, _, b in lm.lora_pairs(MAIN):
            b.zero_()
    bank = AdapterBank(lm, MAIN, normalize="product")
    bank.push()
    assert all(float(a.abs().max()) == 0.0 for n in bank.banks for a, _ in bank.past_factors(n))
    bank.remove()
    cfg = tiny_config(Path("."), Path("."))
    sdlora = build_strategy(StrategySpec(name="sdlora"), Env(lm, None, cfg), seed=0)  # type: ignore[arg-type]
    assert sdlora.past_normalization() == "product"


def test_learnable_magnitudes_get_gradients(lm: LoraLM) -> None:
    bank = AdapterBank(lm, MAIN, normalize="factors", learnable=True)
    bank.push()
    ids = torch.tensor([[3, 50, 7, 90, 12]])
    lm.model(input_ids=ids, labels=ids).loss.backward()
    mags = bank.magnitude_parameters()
    assert mags and all(m.grad is not None and m.grad.abs().sum() > 0 for m in mags)
    bank.remove()


def test_orthogonality_loss_vanishes_for_orthogonal_subspaces() -> None:
    q, _ = torch.linalg.qr(torch.randn(32, 32))
    a_old, a_new = q[:4].contiguous(), q[4:8].contiguous()
    b = torch.randn(16, 4)
    assert float(orthogonality_loss([(a_old, b)], a_new, b, include_b=False)) == pytest.approx(0.0, abs=1e-10)
    assert float(orthogonality_loss([(a_old, b)], a_old, b, include_b=False)) == pytest.approx(4.0, rel=1e-5)
    assert float(orthogonality_loss([(a_old, b)], a_new, b, include_b=True)) > 0


def test_orthogonality_loss_forms_paper_squared_and_code_abs() -> None:
    torch.manual_seed(0)
    a_old, a_new = torch.randn(4, 32), torch.randn(4, 32)
    b_old, b_new = torch.randn(16, 4), torch.randn(16, 4)
    past = [(a_old, b_old)]
    inner, outer = a_old @ a_new.T, b_old.T @ b_new
    squared = orthogonality_loss(past, a_new, b_new, include_b=True)
    absolute = orthogonality_loss(past, a_new, b_new, include_b=True, form="abs")
    assert float(squared) == pytest.approx(float(inner.pow(2).sum() + outer.pow(2).sum()), rel=1e-5)
    assert float(absolute) == pytest.approx(float(inner.abs().sum() + outer.abs().sum()), rel=1e-5)


def test_olora_starts_each_stage_fresh_and_adds_the_code_l2_term(lm: LoraLM) -> None:
    """The paper trains a new LoRA per task (fresh); the authors' code adds lambda_2 * sum ||P||_F over
    the new LoRA's A and B, offered as `lam_l2`."""
    from evolora.config import StrategySpec
    from evolora.continual import Env, build_strategy

    cfg = tiny_config(Path("."), Path("."))
    env = Env(lm, None, cfg)  # type: ignore[arg-type]
    default = build_strategy(StrategySpec(name="olora"), env, seed=0)
    assert default.options.init == "fresh" and default.options.lam_l2 == 0
    only_l2 = build_strategy(StrategySpec(name="olora", lam=0.0, lam_l2=0.25), env, seed=0)
    only_l2.setup()
    only_l2.bank.push()
    assert only_l2.regularized(2) and not only_l2.regularized(1)
    expected = 0.25 * sum(float(a.detach().norm() + b.detach().norm()) for _, a, b in lm.lora_pairs(MAIN))
    assert float(only_l2.extra_loss(None).detach()) == pytest.approx(expected, rel=1e-5)  # type: ignore[arg-type,union-attr]
    only_l2.bank.remove()


def test_inflora_design_avoids_the_old_subspace() -> None:
    torch.manual_seed(0)
    d = 24
    old_inputs = torch.randn(500, 6) @ torch.randn(6, d)  # old stage lives in a 6-dim subspace
    basis = update_basis(None, old_inputs.T @ old_inputs / 500, energy=0.99, max_dim=d - 4)
    assert 1 <= basis.shape[1] <= 6
    torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-5, rtol=1e-5)
    new_inputs = torch.randn(500, d)
    a = designed_a(basis, new_inputs.T @ new_inputs / 500, rank=4)
    assert a.shape == (4, d)
    assert float((a @ basis).abs().max()) < 1e-4  # B A x == 0 for every x in the old subspace
    grown = update_basis(basis, new_inputs.T @ new_inputs / 500, energy=0.9, max_dim=d - 4)
    assert grown.shape[1] > basis.shape[1]
    torch.testing.assert_close(grown[:, : basis.shape[1]], basis)


# ---------------------------------------------------------------------------------------------- in the loop
ALL = [
    ("peso", {}),
    ("peso", {"penalty": "l2"}),
    ("lsat", {"long_stages": 1}),
    ("lsat", {"inference": "fusion", "fusion": "factors", "grid": [0.0, 0.5, 1.0]}),
    ("sumlora", {"past": "latest", "init": "fresh"}),
    ("sdlora", {}),
    ("inflora", {}),
    ("olora", {"lam": 0.5}),
]


@pytest.mark.parametrize(("name", "options"), ALL)
def test_every_strategy_runs_the_loop(sunny_dir: Path, tmp_path: Path, name: str, options: dict) -> None:
    spec = {"name": name, **options}
    import yaml

    cfg = tiny_config(
        sunny_dir,
        tmp_path,
        **{"strategies": yaml.safe_dump([spec], default_flow_style=True).strip(), "train.epochs": 1},
    )
    (res,) = run_experiment(cfg)
    assert res["complete"] and len(res["stages"]) == 2
    stage2 = res["stages"][1]
    assert 0.0 <= stage2["metrics"]["auc"] <= 1.0
    if name in ("peso", "olora"):
        assert stage2["jobs"][0]["history"][-1]["extra_loss"] > 0
    if name == "lsat":
        key = "alpha" if options.get("inference", "ensemble") == "ensemble" else "lambda"
        assert stage2["strategy_info"][key] in (options.get("grid") or [round(0.1 * i, 1) for i in range(11)])


def test_peso_with_zero_lambda_is_finetune(sunny_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(
        sunny_dir, tmp_path, strategies="[finetune, {name: peso, lam: 0.0}]", **{"train.epochs": 1}
    )
    finetune, peso = run_experiment(cfg)
    assert [s["metrics"] for s in peso["stages"]] == [s["metrics"] for s in finetune["stages"]]


def test_strategy_state_survives_an_interruption(sunny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Kill SD-LoRA (bank + magnitudes) and LSAT (two adapters + weight) inside stage 3, then resume."""
    from evolora.tasks.ctr import CtrTask

    over = {"strategies": "[sdlora, lsat]", "staging.n_stages": 4, "train.epochs": 2}
    reference = run_experiment(tiny_config(sunny_dir, tmp_path / "ref", **over))
    cfg = tiny_config(sunny_dir, tmp_path / "run", **over)
    real = CtrTask.loss
    state = {"n": 0}

    def dying(self, lm, rows):
        state["n"] += 1
        if state["n"] in (12 * 5, 12 * 11):
            raise KeyboardInterrupt
        return real(self, lm, rows)

    monkeypatch.setattr(CtrTask, "loss", dying)
    for _ in range(3):
        try:
            run_experiment(cfg)
            break
        except KeyboardInterrupt:
            continue
    monkeypatch.setattr(CtrTask, "loss", real)
    resumed = run_experiment(cfg)
    for a, b in zip(resumed, reference, strict=True):
        assert a["complete"]
        for sa, sb in zip(a["stages"], b["stages"], strict=True):
            assert sa["metrics"] == pytest.approx(sb["metrics"], abs=1e-9)
            assert sa["strategy_info"] == sb["strategy_info"]


def test_retrain_with_the_first_budget_shares_lsat_full_long_term_training(
    sunny_dir: Path, tmp_path: Path
) -> None:
    over = {
        "strategies": "[{name: lsat, long_mode: full}, {name: retrain, label: r1, budget: first}, retrain]",
        "train.samples_per_stage": "[48, 16]",
        "train.epochs": 1,
    }
    lsat, first, stage = run_experiment(tiny_config(sunny_dir, tmp_path, **over))
    assert [s["n_train"] for s in first["stages"]] == [48, 48]
    assert [s["n_train"] for s in stage["stages"]] == [48, 16]
    # Stage 2: the same draw as LSAT's long-term LoRA, so it was trained once and reused.
    assert first["stages"][1]["jobs"][0]["reused_shared_result"]
    long_job = next(j for j in lsat["stages"][1]["jobs"] if j["adapter"] == "long")
    assert first["stages"][1]["jobs"][0]["shared_key"] == long_job["shared_key"]


@pytest.mark.parametrize("inference", ["ensemble", "fusion"])
def test_lsat_scores_once_when_long_and_short_term_are_one_adapter(
    sunny_dir: Path, tmp_path: Path, inference: str, monkeypatch
) -> None:
    """At stage 1 both LSAT adapters are the shared D1 result: the weight cannot matter, so LSAT scores one
    adapter (not one pass per grid weight) and gives exactly finetune's stage-1 predictions."""
    from evolora.tasks.ctr import CtrTask

    real, passes = CtrTask.predict, []

    def counting(self, lm, rows, batch_size, desc="scoring"):
        passes.append(desc)
        return real(self, lm, rows, batch_size, desc)

    monkeypatch.setattr(CtrTask, "predict", counting)
    spec = f"{{name: lsat, long_stages: 1, inference: {inference}, grid: [0.0, 0.5, 1.0]}}"
    cfg = tiny_config(sunny_dir, tmp_path, strategies=f"[finetune, {spec}]", **{"train.epochs": 1})
    finetune, lsat = run_experiment(cfg)
    key = "alpha" if inference == "ensemble" else "lambda"
    info = lsat["stages"][0]["strategy_info"]
    assert info[key] == 0.0 and len(set(info[f"valid_auc_by_{key}"].values())) == 1
    assert lsat["stages"][0]["metrics"] == finetune["stages"][0]["metrics"]
    with (
        np.load(run_dir_of(cfg, "finetune", 0) / "stage-1" / "predictions.npz") as a,
        np.load(run_dir_of(cfg, "lsat", 0) / "stage-1" / "predictions.npz") as b,
    ):
        np.testing.assert_array_equal(a["scores"], b["scores"])
    # LSAT's passes (the last in the run): stage 1 one validation, and its evaluation is finetune's, read
    # from the shared store (the same D1 adapter on the same rows); stage 2 trains a new short-term adapter
    # (its epoch's validation) and searches the grid again with both adapters.
    if inference == "ensemble":
        stage2 = ["validating (long-term)", "validating (short-term)"]
        stage2 += ["evaluating stage 3 (long-term)", "evaluating stage 3 (short-term)"]
    else:
        stage2 = [f"validating fusion {w}" for w in (0.0, 0.5, 1.0)] + ["evaluating stage 3"]
    expected = ["validating", "validating", *stage2]
    assert passes[-len(expected) :] == expected


@pytest.mark.parametrize("mode", ["delta", "factors"])
def test_fusion_interpolates_the_token_rows_too(mode: str) -> None:
    """LSAT-TA on next-item: at weight 1 the fused adapter is the long-term adapter, at 0 the short-term one,
    added token rows (semantic IDs) included."""
    from evolora.config import StrategySpec
    from evolora.continual import Env, build_strategy

    lm = LoraLM.from_config(tiny_model(), new_tokens=["<a_0>", "<a_1>", "<b_0>", "<b_1>"])
    token_ids = lm.tokenizer.convert_tokens_to_ids(["<a_0>", "<b_1>", "<a_1>"])
    cfg = tiny_config(Path("."), Path("."))
    strategy = build_strategy(StrategySpec(name="lsat", fusion=mode), Env(lm, None, cfg), seed=0)  # type: ignore[arg-type]
    strategy.setup()
    with torch.no_grad():
        for adapter in (MAIN, LONG):
            for _, a, b in lm.lora_pairs(adapter):
                a.normal_(0, 0.2)
                b.normal_(0, 0.2)
            for layer in lm.token_layers():
                layer.trainable_tokens_delta[adapter].normal_(0, 1.0)
    ids = torch.tensor([[3, *token_ids, 50, 7]])

    def logits(adapter: str) -> torch.Tensor:
        lm.activate(adapter, trainable=False)
        with torch.no_grad():
            return lm.model(input_ids=ids).logits

    for weight, alone in ((1.0, LONG), (0.0, MAIN)):
        strategy.build_fused(weight)
        torch.testing.assert_close(logits("fused"), logits(alone), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(logits(LONG), logits(MAIN), atol=1e-3)


def test_inflora_designs_a_from_stage_one_and_plain_is_the_shared_lora(
    sunny_dir: Path, tmp_path: Path
) -> None:
    """As the paper does from the first task on, InfLoRA's stage-1 A is the stage's top input directions
    (orthonormal rows, frozen) and only B learns; `first_stage: plain` is the plain LoRA the other strategies
    share at stage 1 (the default until 2026-12-04, which runs recorded then keep)."""
    from evolora.continual import recorded_options
    from evolora.experiment import restore_run

    strategies = "[finetune, inflora, {name: inflora, label: inflora-plain, first_stage: plain}]"
    cfg = tiny_config(sunny_dir, tmp_path, strategies=strategies, **{"train.epochs": 1})
    finetune, designed, plain = run_experiment(cfg)
    first = [r["stages"][0] for r in (finetune, designed, plain)]
    assert first[2]["metrics"] == first[0]["metrics"] and first[2]["jobs"][0]["reused_shared_result"]
    assert first[1]["metrics"] != first[0]["metrics"] and not first[1]["jobs"][0]["reused_shared_result"]
    assert first[1]["cost"]["parts"]["inflora_statistics"]["tokens"] > 0
    strategy, _, _ = restore_run(run_dir_of(cfg, "inflora", 0), stage=1)
    try:
        for _, a, b in strategy.lm.lora_pairs(MAIN):
            torch.testing.assert_close(a.detach() @ a.detach().T, torch.eye(a.shape[0]), atol=1e-5, rtol=0)
            assert float(b.detach().abs().max()) > 0  # A kept its design (orthonormal rows): only B learned
    finally:
        strategy.teardown()
    assert recorded_options({"strategy": "inflora", "options": {}})["first_stage"] == "plain"


def test_the_options_to_pin_keep_a_labelled_folders_label(tmp_path: Path) -> None:
    """A folder recorded before InfLoRA's `first_stage` existed ran `plain`: rerunning it under today's
    default names the options to pin, with its label when it has one, so the entry pasted back keeps it."""
    from evolora.continual import option_changes

    for label, pin in [
        ("inflora", "{name: inflora, first_stage: plain}"),
        ("inflora-old", "{name: inflora, label: inflora-old, first_stage: plain}"),
    ]:
        run_dir = tmp_path / label / "seed0"
        run_dir.mkdir(parents=True)
        (run_dir / "run.json").write_text(json.dumps({"strategy": "inflora", "options": {}}))
        changed = option_changes(run_dir, "inflora", {})
        assert changed is not None and changed.pin == pin, changed
        assert f"pin what it ran with ({pin})" in changed.message()


def test_inflora_does_not_depend_on_the_evaluation_batch(sunny_dir: Path, tmp_path: Path) -> None:
    """`eval.batch_size` is a setting that changes no number (an experiment rerun with another one goes on),
    so InfLoRA's input statistics, whose padded sums depend on the rows per pass, take `stats_batch`."""
    over = {"strategies": "[inflora]", "train.epochs": 1}
    runs = [
        run_experiment(tiny_config(sunny_dir, tmp_path / str(b), **over, **{"eval.batch_size": b}))[0]
        for b in (16, 3)
    ]
    for a, b in zip(runs[0]["stages"], runs[1]["stages"], strict=True):
        assert a["metrics"] == pytest.approx(b["metrics"], abs=1e-6)
    other = tiny_config(
        sunny_dir, tmp_path / "other", **{**over, "strategies": "[{name: inflora, stats_batch: 3}]"}
    )
    assert run_experiment(other)[0]["stages"][1]["metrics"] != runs[0]["stages"][1]["metrics"]
