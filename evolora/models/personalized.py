"""Personalized LoRA: a bank of meta-LoRAs per adapted projection and a soft routing gate (RecLoRA).

For every adapted projection (q_proj, v_proj by default) there are N meta-LoRAs (A_k: r x d_in,
B_k: d_out x r) and a gate, LayerNorm -> Linear(d_gate, 60) -> ReLU -> Dropout -> Linear(60, N), that maps a
per-sample vector z (RecLoRA: the hidden representation of a conventional CTR model) to routing weights
alpha = softmax(gate(z) / temperature). Each sample in a batch then gets its own low-rank update:

* `combine: factors` (RecLoRA's released code): A_u = sum_k alpha_k A_k, B_u = sum_k alpha_k B_k, and
  delta = s * B_u A_u x. The per-sample adapter is a plain rank-r LoRA (it can be exported as one), with
  cross terms alpha_j alpha_k B_j A_k.
* `combine: products`: delta = s * sum_k alpha_k B_k A_k x, the weighted sum of the meta-LoRAs' updates
  (no cross terms; a rank N*r update per sample, N times the compute).

Everything is batched with einsum: different users in one batch get different adapters in one pass, with no
Python loop over samples. The layers hook into the model's forward; the gate inputs of the current batch
are set by `set_route(z)` (RecLoRA does it from the rows the task announces, see `LoraLM.begin_batch`), or
for a block of code by `with route(z):`. Initialisation follows
the code: A_k Kaiming-uniform, B_k zero, so training starts from the base model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from evolora.errors import ConfigError
from evolora.models.llm import LoraLM
from evolora.models.weights import base_to_load

# what marks a folder as an exported user adapter (which a new export may replace)
USER_ADAPTER_MARKER = "evolora_user_adapter.json"


class MetaLoRABank(nn.Module):
    """N meta-LoRAs and the gate of one projection."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        d_gate: int,
        n_meta: int = 8,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        temperature: float = 1.0,
        gate_hidden: int = 60,
        gate_dropout: float = 0.1,
        combine: str = "factors",
    ) -> None:
        super().__init__()
        self.rank, self.scaling, self.temperature, self.combine = rank, alpha / rank, temperature, combine
        self.A = nn.Parameter(torch.empty(n_meta, rank, d_in))
        self.B = nn.Parameter(torch.zeros(n_meta, d_out, rank))
        self.dropout = nn.Dropout(dropout)
        self.gate = nn.Sequential(
            nn.LayerNorm(d_gate),
            nn.Linear(d_gate, gate_hidden),
            nn.ReLU(),
            nn.Dropout(gate_dropout),
            nn.Linear(gate_hidden, n_meta),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for k in range(self.A.shape[0]):
            nn.init.kaiming_uniform_(self.A.data[k], a=math.sqrt(5))
        nn.init.zeros_(self.B)
        for m in self.gate:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
                nn.init.zeros_(m.bias)

    def weights(self, z: torch.Tensor) -> torch.Tensor:
        """Routing weights [b, N] for gate inputs z [b, d_gate]."""
        return torch.softmax(self.gate(z.to(self.A.dtype)) / self.temperature, dim=-1)

    def per_sample(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The aggregated factors (A_u [b, r, d_in], B_u [b, d_out, r]) of `combine: factors`."""
        a = self.weights(z)
        return torch.einsum("bn,nri->bri", a, self.A), torch.einsum("bn,nor->bor", a, self.B)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The update [b, s, d_out] for inputs x [b, s, d_in]."""
        x = self.dropout(x.to(self.A.dtype))
        if self.combine == "factors":
            a_u, b_u = self.per_sample(z)
            h = torch.einsum("bsi,bri->bsr", x, a_u)
            return torch.einsum("bsr,bor->bso", h, b_u) * self.scaling
        a = self.weights(z)
        h = torch.einsum("bsi,nri->bsnr", x, self.A)
        return torch.einsum("bsnr,nor,bn->bso", h, self.B, a) * self.scaling


class PersonalizedLoRA(nn.Module):
    """Meta-LoRA banks attached to the target projections of a `LoraLM`'s base model."""

    def __init__(
        self,
        lm: LoraLM,
        d_gate: int,
        target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
        seed: int = 0,
        **bank_options: Any,
    ) -> None:
        super().__init__()
        self.lm = lm
        self.banks = nn.ModuleDict()
        self._z: torch.Tensor | None = None
        self._handles: list[RemovableHandle] = []
        targets = []
        for name, module in lm.base.named_modules():
            if name.rsplit(".", 1)[-1] in target_modules and isinstance(_linear_of(module), nn.Linear):
                targets.append((name, module))
        if not targets:
            raise ValueError(f"no {target_modules} projections found in {lm.name}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for name, module in targets:
                lin = _linear_of(module)
                bank = MetaLoRABank(lin.in_features, lin.out_features, d_gate, **bank_options)
                self.banks[name.replace(".", "__")] = bank
                self._handles.append(module.register_forward_hook(self._hook(bank)))
        self.to(lm.device)

    def _hook(self, bank: MetaLoRABank):
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            if self._z is None:
                raise RuntimeError("personalized LoRA needs the batch's gate inputs: set_route(z) first")
            x = args[0]
            if x.shape[0] != self._z.shape[0]:
                raise RuntimeError(f"gate inputs for {self._z.shape[0]} samples, batch of {x.shape[0]}")
            return output + bank(x, self._z).to(output.dtype)

        return hook

    @contextmanager
    def route(self, z: torch.Tensor) -> Iterator[None]:
        """Run forward passes inside the block with per-sample gate inputs z [b, d_gate]."""
        previous, self._z = self._z, z.to(self.lm.device)
        try:
            yield
        finally:
            self._z = previous

    def set_route(self, z: torch.Tensor | None) -> None:
        self._z = None if z is None else z.to(self.lm.device)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def check_exportable(self) -> None:
        """Refuse a bank whose per-sample update is no single LoRA (`combine: products`)."""
        if next(iter(self.banks.values())).combine != "factors":
            raise ConfigError(
                "this run's meta-LoRAs are combined as `products`: only `combine: factors` gives each user "
                "one rank-r LoRA to export"
            )

    def export(self, z: torch.Tensor, path: str | Path, revision: str | None = None) -> None:
        """Save the adapter one gate input selects as a plain PEFT LoRA into `path` (replaced atomically;
        `evolora export-user-adapter` writes the whole folder, with the sample's prompt and a README)."""
        from evolora.io import atomic_directory, check_replaceable

        self.check_exportable()
        path = check_replaceable(path, USER_ADAPTER_MARKER, "user adapter")
        with atomic_directory(path) as out:
            config = self.write_adapter(z, out, revision)
            # Its own mark: a run's adapter folders hold adapter_config.json too, and are never replaced.
            (out / USER_ADAPTER_MARKER).write_text(
                json.dumps({"base_model": config["base_model_name_or_path"], "rank": config["r"]})
            )

    def write_adapter(self, z: torch.Tensor, folder: Path, revision: str | None = None) -> dict[str, Any]:
        """Write the adapter one gate input selects as a plain PEFT LoRA (rank r; `combine: factors` only)
        into `folder` and return its config: on the base the run loaded, `lm.name` at `revision`, or
        evolora's converted copy where it read that, a local folder by its absolute path."""
        from safetensors.torch import save_file

        self.check_exportable()
        any_bank = next(iter(self.banks.values()))
        state = {}
        modules = set()
        was_training = self.training
        self.eval()  # the gate's dropout must not perturb an exported adapter
        with torch.no_grad():
            for key, bank in self.banks.items():
                a_u, b_u = bank.per_sample(z.reshape(1, -1).to(self.lm.device))
                name = key.replace("__", ".")
                modules.add(name.rsplit(".", 1)[-1])
                state[f"base_model.model.{name}.lora_A.weight"] = a_u[0].float().cpu().contiguous()
                state[f"base_model.model.{name}.lora_B.weight"] = b_u[0].float().cpu().contiguous()
        self.train(was_training)
        base, revision = base_to_load(self.lm.name, revision)
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base,
            **({"revision": revision} if revision else {}),
            "r": any_bank.rank,
            "lora_alpha": any_bank.scaling * any_bank.rank,
            "lora_dropout": 0.0,
            "target_modules": sorted(modules),
            "bias": "none",
        }
        save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
        return config


def _linear_of(module: nn.Module) -> nn.Module:
    """The plain Linear behind a module (PEFT wraps targeted projections in a LoRA layer)."""
    return getattr(module, "base_layer", module)
