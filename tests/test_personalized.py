"""RecLoRA's personalized LoRA layer: meta-LoRA banks with a soft routing gate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evolora.errors import ConfigError
from evolora.models.llm import LoraLM
from evolora.models.personalized import MetaLoRABank, PersonalizedLoRA
from tests.helpers import tiny_model


@pytest.fixture
def lm() -> LoraLM:
    return LoraLM.from_config(tiny_model(lora={"dropout": 0.0}))


def randomize(p: PersonalizedLoRA, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bank in p.banks.values():
            bank.B.copy_(torch.randn(bank.B.shape, generator=g) * 0.1)
            for m in bank.gate:
                if isinstance(m, torch.nn.Linear):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g))


IDS = torch.tensor([[3, 50, 7, 90, 12], [8, 1, 44, 2, 60], [9, 9, 30, 31, 5]])


def test_one_meta_lora_with_any_gate_is_a_plain_lora(lm: LoraLM) -> None:
    p = PersonalizedLoRA(lm, d_gate=6, n_meta=1, rank=8, alpha=16.0)
    randomize(p)
    p.eval()
    z = torch.randn(3, 6)
    with torch.no_grad(), p.route(z):
        personalized = lm.model(input_ids=IDS).logits
    p.remove()
    # The same factors as the default PEFT adapter give the same model.
    layers = dict(lm.base.named_modules())
    with torch.no_grad():
        for key, bank in p.banks.items():
            module = layers[key.replace("__", ".")]
            module.lora_A["default"].weight.copy_(bank.A[0])
            module.lora_B["default"].weight.copy_(bank.B[0])
        plain = lm.model(input_ids=IDS).logits
    torch.testing.assert_close(personalized, plain, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("combine", ["factors", "products"])
def test_each_sample_gets_its_own_adapter(lm: LoraLM, combine: str) -> None:
    p = PersonalizedLoRA(lm, d_gate=6, n_meta=4, combine=combine)
    randomize(p)
    p.eval()
    z = torch.randn(3, 6)
    with torch.no_grad(), p.route(z):
        batched = lm.model(input_ids=IDS).logits
    for i in range(3):
        with torch.no_grad(), p.route(z[i : i + 1]):
            alone = lm.model(input_ids=IDS[i : i + 1]).logits
        torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=1e-4)
    # Different gate inputs really give different outputs for the same tokens.
    same = IDS[:1].repeat(2, 1)
    with torch.no_grad(), p.route(z[:2]):
        out = lm.model(input_ids=same).logits
    assert not torch.allclose(out[0], out[1])


def test_bank_matches_its_definition() -> None:
    torch.manual_seed(0)
    bank = MetaLoRABank(d_in=5, d_out=7, d_gate=3, n_meta=4, rank=2, alpha=4.0, gate_dropout=0.0)
    with torch.no_grad():
        bank.B.normal_()
    x, z = torch.randn(2, 3, 5), torch.randn(2, 3)
    alpha = bank.weights(z)
    a_u = sum(alpha[:, k, None, None] * bank.A[k] for k in range(4))
    b_u = sum(alpha[:, k, None, None] * bank.B[k] for k in range(4))
    expected = torch.stack([x[i] @ a_u[i].T @ b_u[i].T for i in range(2)]) * 2.0
    torch.testing.assert_close(bank(x, z), expected, atol=1e-5, rtol=1e-5)
    bank.combine = "products"
    expected = (
        torch.stack([sum(alpha[i, k] * x[i] @ bank.A[k].T @ bank.B[k].T for k in range(4)) for i in range(2)])
        * 2.0
    )
    torch.testing.assert_close(bank(x, z), expected, atol=1e-5, rtol=1e-5)


def test_gate_and_bank_receive_gradients(lm: LoraLM) -> None:
    p = PersonalizedLoRA(lm, d_gate=6, n_meta=4)
    randomize(p)
    z = torch.randn(3, 6)
    with p.route(z):
        lm.model(input_ids=IDS, labels=IDS).loss.backward()
    for bank in p.banks.values():
        assert bank.B.grad is not None and bank.B.grad.abs().sum() > 0
        assert bank.A.grad is not None and bank.A.grad.abs().sum() > 0
        gate_grads = [m.weight.grad for m in bank.gate if isinstance(m, torch.nn.Linear)]
        assert all(g is not None and g.abs().sum() > 0 for g in gate_grads)


def test_missing_route_is_an_error_and_export_is_a_peft_lora(lm: LoraLM, tmp_path: Path) -> None:
    from peft import PeftModel

    from evolora.models.weights import load_pretrained

    p = PersonalizedLoRA(lm, d_gate=6, n_meta=4)
    randomize(p)
    p.eval()
    with pytest.raises(RuntimeError, match="route"):
        lm.model(input_ids=IDS)
    z = torch.randn(1, 6)
    with torch.no_grad(), p.route(z):
        expected = lm.model(input_ids=IDS[:1]).logits
    p.export(z[0], tmp_path / "user")
    base, _ = load_pretrained("tiny", torch.float32)
    user_model = PeftModel.from_pretrained(base, str(tmp_path / "user"))
    with torch.no_grad():
        torch.testing.assert_close(user_model(input_ids=IDS[:1]).logits, expected, atol=1e-5, rtol=1e-4)
    p.export(z[0], tmp_path / "user")  # an earlier user adapter is replaced
    # A folder of PEFT's own files (a run's trained adapter, say) is not a user adapter: refused, kept.
    adapter = tmp_path / "trained-adapter"
    user_model.save_pretrained(adapter)
    assert (adapter / "adapter_config.json").is_file()
    with pytest.raises(ConfigError, match="not an earlier user adapter"):
        p.export(z[0], adapter)
    for bank in p.banks.values():
        bank.combine = "products"
    with pytest.raises(ConfigError, match="only `combine: factors` gives each user one rank-r LoRA"):
        p.export(z[0], tmp_path / "products")
