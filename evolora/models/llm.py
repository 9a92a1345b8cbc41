"""The LLM backbone with LoRA adapters (its weights come from `models/weights.py`).

`LoraLM` wraps the PEFT model: named adapters that can be reset from a seed, snapshotted, restored, saved in
PEFT's format and switched, plus the autocast context that `precision: bf16-mixed` (or `fp16`) asks for and
gradient checkpointing for training (`train.gradient_checkpointing`). Any causal LM family works: the LoRA
targets and the pad token follow the family where the config and the tokenizer leave them open
(`models/weights.py`); with `model.quantization` the base is a QLoRA one (bitsandbytes, CUDA).

Past ~400 lines: `LoraLM` is one class, and every strategy and task reaches PEFT through it; split, its
adapter bookkeeping and its forward passes would each need the other's private state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evolora import cost, parallel
from evolora.config import LoraConfig, ModelConfig
from evolora.errors import ConfigError, DamagedFileError, EvoloraError
from evolora.io import atomic_directory, load_tensors
from evolora.models import token_rows
from evolora.models.kv_cache import cache_of, repeat_rows, run_decoder
from evolora.models.precision import (
    autocast_dtype_of,
    resolve_device,
    resolve_precision,
    warn_if_cores_busy,
    without_autocast,
)
from evolora.models.weights import is_quantized, load_base, target_modules_for

log = logging.getLogger("evolora.models")

# --------------------------------------------------------------------------------------------- LoRA


def _peft_config(cfg: LoraConfig, token_rows: list[int] | dict[str, list[int]] | None = None):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        # Rows of added tokens (semantic IDs) train with each adapter (`_token_layers`).
        trainable_token_indices=token_rows or None,
    )


def _token_layers(base: nn.Module, token_ids: list[int]) -> list[int] | dict[str, list[int]]:
    """Where the added tokens' rows train: the input embedding, whose rows a tied output layer shares (PEFT
    follows it), and an untied output layer's own rows, which generating the tokens reads: left out, they
    would stay at their random initialisation."""
    embedding, head = base.get_input_embeddings(), base.get_output_embeddings()
    if head is None or head.weight is embedding.weight:
        return token_ids
    names = {id(module): name for name, module in base.named_modules()}
    return {names[id(embedding)]: token_ids, names[id(head)]: token_ids}


def _is_adapter_param(param_name: str, adapter: str) -> bool:
    """LoRA factors and trainable token rows of one adapter, by PEFT's parameter names."""
    mine = f".{adapter}." in param_name or param_name.endswith(f".{adapter}")
    return mine and ("lora_" in param_name or "trainable_tokens_delta" in param_name)


@dataclass
class LoraLM:
    """A causal LM with named LoRA adapters (PEFT), on one device.

    Only LoRA weights are ever trainable here; the base weights stay frozen. Adapter weights are kept in fp32
    whatever the base precision; regularisers on them run outside autocast (PESO's softmax-KL in fp64, see
    `continual/peso.py`; the others in fp32).
    """

    model: nn.Module  # peft.PeftModel
    tokenizer: object
    device: torch.device
    autocast_dtype: torch.dtype | None  # bf16 (bf16-mixed), fp16 (fp16) or None
    lora: LoraConfig  # with the target modules actually adapted (a family's own where the default is absent)
    name: str
    new_token_ids: list[int] | None = None
    #: PEFT's `trainable_token_indices` for each adapter: the added tokens' rows, in the layers that train
    #: them (`_token_layers`; None: the input embedding's, which a tied output layer shares)
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    #: called with the sample rows of every batch before its forward pass (per-sample adapters route by them)
    batch_hooks: list[Callable[[np.ndarray], None]] = field(default_factory=list)
    #: a shared prefix runs as its own pass, its keys/values repeated over the batch (True), or in front of
    #: every row (False); None: as `splits_prefix` decides for the device. The states are the same. False
    #: while per-sample adapters are attached: a prefix run once cannot serve different adapters.
    separate_prefix_pass: bool | None = None
    #: True inside `gradient_checkpointing()`: training passes recompute layer activations in the backward
    checkpointing: bool = False
    #: `model.merge_lora`: gradient-free passes merge the LoRA update into the weights (`models/merged.py`)
    merge_lora: bool = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(
        cls,
        cfg: ModelConfig,
        seed: int = 0,
        new_tokens: list[str] | None = None,
        pretrained: tuple[nn.Module, object] | None = None,
    ) -> LoraLM:
        """Load the backbone and wrap it with one LoRA adapter, `default`.

        `new_tokens` (semantic IDs, say) are added to the vocabulary with freshly initialised rows that train
        with every adapter; everything else stays frozen. `pretrained` passes an already loaded
        (model, tokenizer), e.g. one used to embed item texts before the vocabulary was known.
        """
        from peft import get_peft_model

        device = resolve_device(cfg.device)
        dtype, mixed = resolve_precision(cfg.precision, device)
        base, tok = load_base(cfg.name, dtype, cfg.revision, cfg.quantization, device, pretrained)
        # A quantized base keeps norms and embeddings in fp32 and computes under autocast (QLoRA's recipe).
        mixed = mixed or (is_quantized(base) and dtype != torch.float32)
        new_ids = None
        if new_tokens:
            known = set(tok.get_vocab())
            clash = [t for t in new_tokens if t in known]
            if clash:
                raise EvoloraError(f"new tokens already in the vocabulary of {cfg.name}: {clash[:5]}")
            tok.add_tokens(list(new_tokens), special_tokens=True)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                base.resize_token_embeddings(len(tok), mean_resizing=False)
            new_ids = tok.convert_tokens_to_ids(list(new_tokens))
        default = LoraConfig.model_fields["target_modules"].default
        targets, source = target_modules_for(base, cfg.lora.target_modules, default, cfg.name)
        lora = cfg.lora.model_copy(update={"target_modules": targets})
        log.info("LoRA adapts %s of %s (%s)", ", ".join(targets), cfg.name, source)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # PEFT reads a property transformers 5 deprecated: a warning no evolora user can act on
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
            torch.manual_seed(seed)
            rows = _token_layers(base, new_ids) if new_ids else None
            peft_model = get_peft_model(base, _peft_config(lora, rows), adapter_name="default")
        lm = cls(peft_model, tok, device, autocast_dtype_of(dtype, mixed), lora, cfg.name, new_ids, rows)
        lm.merge_lora = cfg.merge_lora
        lm._to_device()
        lm._adapters_to_fp32()
        token_rows.install(lm.model)
        lm.model.eval()
        count_tokens_of(lm.base)
        return lm

    def shard(self) -> None:
        """Under an FSDP launch: cut the decoder layers' frozen weights into one shard per process
        (`parallel.shard_layers`); LoRA factors and trainable token rows stay whole in every process."""
        layers = getattr(self.base.get_decoder(), "layers", None)
        if layers is None:
            raise ConfigError(f"FSDP: {self.name} has no list of decoder layers to shard; launch with DDP")
        keep = {
            p
            for n, p in self.model.named_parameters()
            if p.requires_grad or "lora_" in n or "trainable_tokens" in n
        }
        held, total = parallel.shard_layers(list(layers), keep)
        log.info(
            "FSDP: this process holds %.1f%% of the decoder layers' weights (%.4g of %.4g MB)",
            100 * held / total,
            held / 2**20,
            total / 2**20,
        )

    @property
    def precision(self) -> str:
        """The precision actually used (`auto` resolved): fp32, bf16, bf16-mixed or fp16."""
        if self.autocast_dtype is not None:
            return "fp16" if self.autocast_dtype == torch.float16 else "bf16-mixed"
        dtype = next(self.base.parameters()).dtype
        return "bf16" if dtype == torch.bfloat16 else "fp32"

    @property
    def loss_scaling(self) -> bool:
        """Whether training must scale the loss (fp16 gradients underflow without it)."""
        return self.autocast_dtype == torch.float16

    @property
    def quantized(self) -> bool:
        return is_quantized(self.base)

    def _to_device(self) -> None:
        # bitsandbytes places quantized weights when loading and refuses `.to()`; PEFT creates LoRA weights
        # beside the layer they adapt.
        if not self.quantized:
            self.model.to(self.device)

    # ------------------------------------------------------------------ adapters
    @property
    def adapters(self) -> list[str]:
        return list(self.model.peft_config)

    def add_adapter(self, name: str, lora: LoraConfig | None = None, seed: int = 0) -> None:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} exists")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model.add_adapter(
                name, _peft_config(lora or self.lora, self.trainable_token_indices or self.new_token_ids)
            )
        self._to_device()
        self.model.train(self.model.training)  # new dropout layers start in training mode; follow the model
        self._adapters_to_fp32()
        token_rows.install(self.model)

    def delete_adapter(self, name: str) -> None:
        self.model.delete_adapter(name)

    def reset_to(self, keep: list[str]) -> None:
        """Drop every adapter not in `keep` (a new strategy run starts from a clean model)."""
        # Route to a kept adapter first: PEFT warns when the active adapter is deleted, and then picks the
        # next one itself and makes it trainable (the call after the loop sets that right either way).
        self.activate(keep[0], trainable=False)
        for name in self.adapters:
            if name not in keep:
                self.delete_adapter(name)
        self.activate(keep[0], trainable=False)

    def lora_layers(self) -> Iterator[tuple[str, nn.Module]]:
        from peft.tuners.lora import LoraLayer

        for n, m in self.model.named_modules():
            if isinstance(m, LoraLayer):
                yield n, m

    def lora_pairs(self, adapter: str = "default") -> list[tuple[str, nn.Parameter, nn.Parameter]]:
        """(module name, A weight [r, d_in], B weight [d_out, r]) for every adapted module, in model order."""
        return [
            (n, m.lora_A[adapter].weight, m.lora_B[adapter].weight)
            for n, m in self.lora_layers()
            if adapter in m.lora_A
        ]

    def reset_adapter(self, name: str = "default", seed: int = 0, tokens: bool = True) -> None:
        """Fresh LoRA weights (A random, B zero) from `seed`, so the same seed gives the same adapter.

        With `tokens`, trainable token rows (semantic IDs) go back to their initial values too; without, they
        keep what they learned (cumulative strategies start new LoRA factors on top of trained rows).
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for _, m in self.lora_layers():
                if name in m.lora_A:
                    m.reset_lora_parameters(name, init_lora_weights=True)
        if tokens:
            with torch.no_grad():
                for m in self.token_layers():
                    if name in m.trainable_tokens_delta:
                        m.trainable_tokens_delta[name].copy_(m.trainable_tokens_original[name])
        self._adapters_to_fp32()

    def token_layers(self) -> Iterator[nn.Module]:
        """PEFT's layers holding each adapter's rows of added tokens (`trainable_tokens_delta[adapter]`)."""
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

        for m in self.model.modules():
            if isinstance(m, TrainableTokensLayer):
                yield m

    def adapter_state(self, name: str = "default") -> dict[str, torch.Tensor]:
        """A detached CPU copy of the adapter's weights (PEFT key names, adapter name removed)."""
        from peft import get_peft_model_state_dict

        # The base embeddings are not trained (only the added rows, kept as trainable tokens): PEFT would
        # save the whole resized matrix with every adapter.
        state = get_peft_model_state_dict(self.model, adapter_name=name, save_embedding_layers=False)
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def load_adapter_state(self, state: dict[str, torch.Tensor], name: str = "default") -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, state, adapter_name=name)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise EvoloraError(f"adapter weights do not fit this model (e.g. {unexpected[0]})")
        self._adapters_to_fp32()

    def save_adapter(self, path: str | Path, name: str = "default") -> None:
        """Save in PEFT's format (adapter_config.json + adapter_model.safetensors), atomically."""
        from safetensors.torch import save_file

        config = self.model.peft_config[name].to_dict()
        config["base_model_name_or_path"] = self.name
        config["target_modules"] = sorted(config["target_modules"])
        state = {k: v.contiguous() for k, v in self.adapter_state(name).items()}
        with atomic_directory(path) as out:
            save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
            (out / "adapter_config.json").write_text(json.dumps(config, indent=2, default=list))

    def load_adapter(self, path: str | Path, name: str = "default") -> None:
        file = Path(path) / "adapter_model.safetensors"
        if not file.is_file():
            raise DamagedFileError(file, f"no adapter at {path} (missing adapter_model.safetensors)")
        self.load_adapter_state(load_tensors(file), name)

    def activate(self, name: str = "default", trainable: bool = True) -> None:
        """Route forward passes through adapter `name`; only its LoRA weights get gradients."""
        self.model.set_adapter(name)
        for n, p in self.model.named_parameters():
            p.requires_grad_(trainable and _is_adapter_param(n, name))

    @property
    def active_adapter(self) -> str:
        return self.model.active_adapter

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _adapters_to_fp32(self) -> None:
        # Under fp16 the added tokens' rows train in fp32 too: loss scaling cannot unscale fp16 gradients
        # (PEFT casts the rows to the embedding's dtype when it merges them).
        for n, p in self.model.named_parameters():
            tokens = self.loss_scaling and "trainable_tokens_delta" in n
            if ("lora_" in n or tokens) and p.dtype != torch.float32:
                p.data = p.data.float()

    # ------------------------------------------------------------------ forward helpers
    def attach_per_sample(self, name: str, module: nn.Module, route: Callable[[np.ndarray], None]) -> None:
        """Attach a per-sample adapter (RecLoRA's personalized banks): `module` joins the model (so train and
        eval modes reach its dropouts; PEFT never saves it), `route` hears every batch's sample rows before
        its forward pass, and a prompt prefix runs in front of every row (one prefix pass cannot serve
        different adapters)."""
        self.model.add_module(name, module)
        self.batch_hooks.append(route)
        self.separate_prefix_pass = False

    def detach_per_sample(self, name: str, route: Callable[[np.ndarray], None]) -> None:
        """Undo `attach_per_sample`."""
        del self.model._modules[name]
        self.batch_hooks.remove(route)
        if not self.batch_hooks:
            self.separate_prefix_pass = None

    def begin_batch(self, rows: np.ndarray) -> None:
        """Announce the sample rows of the next forward pass to whoever needs them (see `batch_hooks`)."""
        for hook in self.batch_hooks:
            hook(rows)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is not None:
            return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def gradient_checkpointing(self, enabled: bool = True) -> Iterator[None]:
        """Inside the block, training forward passes keep only each layer's input and recompute the rest in
        the backward pass (non-reentrant: the same gradients, LoRA weights inside a layer included)."""
        if not enabled:
            yield
            return
        base = self.base
        kwargs = {"use_reentrant": False}
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x names
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if not getattr(base, "_require_grads_hooks", None):
            # Embedding outputs that require grad: what PEFT's own recipe sets up (and reentrant code needs).
            base.enable_input_require_grads()
        self.checkpointing = True
        try:
            yield
        finally:
            self.checkpointing = False
            if hasattr(base, "activation_checkpointing_disable"):
                base.activation_checkpointing_disable()
            else:
                base.gradient_checkpointing_disable()
            base.disable_input_require_grads()

    @property
    def base(self) -> nn.Module:
        return self.model.get_base_model()

    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Last-layer hidden states [batch, seq, hidden] of `input_ids`, without vocabulary logits.

        `prefix` (1-D token ids) is a text every sequence of the batch starts with (the instruction of a
        prompt template). It is run once, its keys and values are repeated across the batch, and only the
        rest goes through the model per sample; gradients still flow through the prefix. The returned states
        cover `input_ids` only. Where that separate pass does not pay (a GPU: `splits_prefix`) or cannot be
        used, the prefix runs in front of every sequence instead, at the same positions: the same states.
        """
        decoder = self.base.get_decoder()
        if prefix is None or len(prefix) == 0:
            out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return out.last_hidden_state
        n, width = input_ids.shape
        p = len(prefix)
        separate = self.separate_prefix_pass
        if separate is None:
            separate = splits_prefix(input_ids.device)
        # Checkpointed layers keep no KV cache (a recomputed layer would write it twice).
        if not separate or (self.checkpointing and self.model.training and torch.is_grad_enabled()):
            full = torch.cat([prefix.to(input_ids.device)[None].expand(n, p), input_ids], dim=1)
            mask = torch.cat([attention_mask.new_ones(n, p), attention_mask], dim=1)
            return decoder(input_ids=full, attention_mask=mask, use_cache=False).last_hidden_state[:, p:]
        cache = cache_of(decoder(input_ids=prefix[None].to(input_ids.device), use_cache=True))
        repeat_rows(cache, n)
        mask = torch.cat([attention_mask.new_ones(n, p), attention_mask], dim=1)
        positions = torch.arange(p, p + width, device=input_ids.device).expand(n, width)
        out = run_decoder(
            decoder,
            cache,
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
        )
        return out.last_hidden_state

    def logits_from_hidden(self, hidden: torch.Tensor, token_ids: list[int] | None = None) -> torch.Tensor:
        """Logits (fp32) for selected hidden states, applying the model's own output scaling.

        With `token_ids`, only those vocabulary rows are computed (scoring needs two of ~50k), in fp32
        whatever the weights' dtype. The output layer runs outside autocast, in its weights' dtype: under
        bf16-mixed, bf16 logits (~0.1 apart near 10) would tie many yes/no scores and item rankings (under
        bf16 the full vocabulary's logits still are bf16: an fp32 copy of the layer per pass would cost more
        than the pass).
        """
        head = self.base.get_output_embeddings()
        with without_autocast():
            if token_ids is not None and isinstance(head, nn.Linear):
                rows = torch.tensor(token_ids, device=hidden.device)
                bias = head.bias[rows].float() if head.bias is not None else None
                logits = F.linear(hidden.float(), head.weight[rows].float(), bias)
            else:
                logits = head(hidden.to(next(head.parameters()).dtype)).float()
                if token_ids is not None:
                    logits = logits[..., token_ids]
        cfg = self.base.config
        scale = getattr(cfg, "logit_scale", None)
        if scale:
            logits = logits * scale
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


def splits_prefix(device: torch.device) -> bool:
    """Whether a prefix shared by a batch's sequences runs as a pass of its own on `device` (the default of
    `LoraLM.separate_prefix_pass`). On a CPU that pass saves the prefix's arithmetic in every row (~30% of a
    TALLRec prompt). On a GPU the arithmetic is nearly free and a step of a small model is bound by the
    kernels it launches, which the extra pass doubles: measured on an H200 (SmolLM2-135M, bf16, batch 8
    to 64), a CTR training step took 1.7-2.6x and scoring 2.2-3.2x the time of the prefix in every row
    (`benchmarks/profile_train_step.py`, README *Checking a GPU machine*)."""
    return device.type == "cpu"


def pass_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> int:
    """The tokens a decoder pass reads, padding excluded."""
    # With a KV cache the mask also covers the cached positions: the last columns are this pass's tokens
    if attention_mask is not None and attention_mask.dim() == 2:
        return int(attention_mask[:, -input_ids.shape[1] :].sum())
    return input_ids.numel()


def count_tokens_of(model: nn.Module) -> None:
    """Count every pass through `model`'s decoder in the run's cost profile, from now on (once however often
    it is asked: the item embeddings read the loaded model before its LoRA wrapping asks again)."""
    decoder = model.get_decoder()
    if not getattr(decoder, "_evolora_counts_tokens", False):
        decoder.register_forward_pre_hook(_count_tokens, with_kwargs=True)
        decoder._evolora_counts_tokens = True


def _count_tokens(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """The run's cost profile (`cost.py`): tokens each decoder pass reads, padding excluded."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        return
    cost.count_tokens(
        pass_tokens(ids, kwargs.get("attention_mask")), backward=module.training and torch.is_grad_enabled()
    )


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    warn_if_cores_busy()
