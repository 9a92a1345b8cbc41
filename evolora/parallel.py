"""Data parallelism under `accelerate launch`: one run's training and evaluation split over N processes.

(Past 300 lines: DDP's and FSDP's arithmetic and the one-writer protocol are one mechanism, read together.)

`accelerate launch --multi_gpu --num_processes N -m evolora run CONFIG` (or `--config_file` with one of
`configs/accelerate/`) starts N copies of the same command, one per GPU (on a CPU-only machine the processes
share the cores and talk through gloo). Every process runs the same experiment code on the same data and
model; they differ only in which rows they compute:

- training: each micro-batch of `train.batch_size` rows is the *global* batch of a one-process run, split
  into N contiguous shares. Each process backpropagates its share's part of the batch mean
  (loss(share) * |share| / |batch|), and the gradients are summed across processes once per optimiser step
  (one all-reduce per dtype, the arithmetic of PyTorch's DDP) before clipping and the step. Every process
  then takes the step a single process takes on the whole batch, up to float summation order. A strategy's
  extra loss (PESO's KL, O-LoRA's orthogonality, RecLoRA's proximal term) depends on the parameters alone
  and is added after the sum, once, as in one process.
- prediction (evaluation, validation, LSAT's weight search): the rows are split into contiguous shares, each
  process predicts its share and the predictions are gathered, in row order, on every process.
- statistics over rows (InfLoRA's input covariances) are summed across processes (`all_reduce_sum`).

State that is not computed from rows (PESO's anchor, SD-LoRA's magnitudes, RecLoRA's banks, gates and its
router's inputs, the shared-result store) is replicated: every process holds the same copy because it takes
the same steps.

**One writer.** Only the main process writes: `io`'s writers return at once elsewhere, and every process
waits before each write (nobody still reads the old state) and after it (everybody reads the new one):
`one_writer`. Locks,
the log file, progress bars and tracking are the main process's; a lock is taken by the main process while
the others wait for it (`barrier`). Every process thus takes the same decisions from the same files, which
keeps the collective calls in step. Set-up (data, model downloads, semantic IDs, the bundle) runs in the
main process first while the others wait, then in the others, which find the caches filled (`main_first`).

**FSDP** (`configs/accelerate/fsdp.yaml`): the same, with every decoder layer's frozen weights cut into one
shard per process (`shard_layers`, PyTorch's FSDP2 `fully_shard`) and gathered for each forward and backward
of the layer; the LoRA factors stay whole and their gradients are summed as above. A gather needs every
process, so under FSDP the processes run the same number of forward passes: predictions are not split
(each process predicts every row), a process whose share of a micro-batch is empty runs an uncounted pass
on one row with zero weight, and InfLoRA's statistics pad the shorter process with uncounted batches
(`forwards_in_step`). The layers are wrapped by evolora, whatever wrap policy the file names; options
that are not built (parameter offload, accelerate's activation checkpointing, hybrid sharding, a quantized
base, a conventional model) are refused.

**Not built**: DeepSpeed (refused: ZeRO-2 shards what is small for LoRA), `--jobs` together with a
multi-process launch, CPU-RAM-efficient loading under FSDP (every process loads the whole backbone before
keeping its shard), and LoRA dropout identical to one process (each process draws its own masks, seeded
by stage, epoch and process: the same in distribution, not in value; the tests use dropout 0).
`evolora update`, `recommend` and `serve` run in one process. A process whose launcher is killed (kill -9
on `accelerate launch` leaves its children running) exits within a second, as `--jobs` workers do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from evolora.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])

# How long a process waits for the others at a collective call: set-up in the main process (a download,
# RQ-VAE) or another experiment holding a shared job's lock can take long; a crashed process ends the
# launch sooner (torchrun stops the others).
TIMEOUT = timedelta(hours=6)

#: accelerate's launch configs, ddp.yaml and fsdp.yaml: the repository's configs/accelerate, installed with
#: evolora (errors name them where they lie, also outside a checkout)
ACCELERATE_CONFIGS = Path(__file__).resolve().parent / "configs" / "accelerate"

_state: dict[str, Any] = {"world": 1, "rank": 0}
_local = threading.local()  # `solo` (inside main_first) and `inside` (a split prediction in progress)


def launched() -> bool:
    """Whether this process was started by a multi-process launcher (accelerate launch, torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def stop_with_parent(parent: int) -> None:
    """Exit as soon as the process `parent` is no longer this one's parent (it died: the lock on the
    experiment that it or its tree held went with it), checking now and every second. The caller passes the
    pid it was started by, not `os.getppid()` read late: a parent that died first has been replaced."""
    if os.getppid() != parent:
        os._exit(3)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def start(device: str = "auto") -> None:
    """Join the launch's process group (once per process; nothing without a multi-process launch)."""
    if not launched() and _simple_launch_of_several() and not _state.get("told_simple"):
        _state["told_simple"] = True  # (the command and the experiment both start: said once)
        logging.getLogger("evolora").warning(
            "accelerate launch --cpu started one process, whatever --num_processes says (its simple "
            "launcher): leave out --cpu (a machine without a GPU runs the processes on its CPUs)"
        )
    if not launched() or _state["world"] > 1:
        return
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        raise ConfigError(
            "the accelerate launch asks for DeepSpeed, which evolora does not run: its ZeRO-2 shards "
            "optimiser states and gradients, a few MB for LoRA; launch with FSDP "
            f"({ACCELERATE_CONFIGS / 'fsdp.yaml'}) to shard the frozen backbone, "
            f"or with DDP ({ACCELERATE_CONFIGS / 'ddp.yaml'})"
        )
    fsdp = fsdp_settings()
    from accelerate import PartialState

    cpu = device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=TIMEOUT)
    _state.update(world=state.num_processes, rank=state.process_index, device=state.device, fsdp=fsdp)
    # The launcher's agent is the parent: killed (kill -9 leaves its children running), this process goes
    # too, as `--jobs` workers do, instead of running on beside a rerun.
    stop_with_parent(os.getppid())


def _simple_launch_of_several() -> bool:
    """Whether `accelerate launch --cpu --num_processes N` (N > 1) started this process: its simple launcher
    runs the one process it was given, setting the rendezvous address of N as if it were several (no MPI
    launcher, which gives each of its processes a rank, behind it)."""
    mpi = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")
    return (
        "ACCELERATE_USE_CPU" in os.environ
        and "MASTER_PORT" in os.environ
        and not any(v in os.environ for v in mpi)
    )


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() == "true"


def fsdp_settings() -> dict[str, Any] | None:
    """What an FSDP launch asks for (accelerate's FSDP_* variables), checked: None without FSDP, or
    {"reshard_after_forward": bool} (FULL_SHARD: True; SHARD_GRAD_OP: False) when the layers are sharded.
    NO_SHARD is plain data parallelism (None). Options that evolora does not implement are refused, not
    ignored; CPU-RAM-efficient loading is warned about (it changes the loading peak only)."""
    if not _flag("ACCELERATE_USE_FSDP"):
        return None
    value = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "").strip().lower()
    if value in ("", "none"):
        value = os.environ.get("FSDP_SHARDING_STRATEGY", "full_shard").strip().lower()
    value = {"1": "full_shard", "2": "shard_grad_op", "3": "no_shard"}.get(value, value)
    if value in ("true", "full_shard", "none"):
        plan: dict[str, Any] | None = {"reshard_after_forward": True}
    elif value in ("false", "shard_grad_op"):
        plan = {"reshard_after_forward": False}
    elif value == "no_shard":
        plan = None
    else:
        raise ConfigError(
            f"FSDP sharding {value!r}: evolora shards within one group of processes (FULL_SHARD or "
            "SHARD_GRAD_OP; NO_SHARD runs as DDP); hybrid sharding across nodes is not built"
        )
    refused = {
        "FSDP_OFFLOAD_PARAMS": "offloading parameters to the CPU is not built; "
        "set fsdp_offload_params: false",
        "FSDP_ACTIVATION_CHECKPOINTING": "set train.gradient_checkpointing: true in the run's config instead "
        "(the same recomputation, recorded with the run), and fsdp_activation_checkpointing: false",
    }
    for name, why in refused.items():
        if _flag(name):
            raise ConfigError(f"the FSDP launch sets {name.lower()[5:]}: {why}")
    if _flag("FSDP_CPU_RAM_EFFICIENT_LOADING") and os.environ.get("RANK", "0") == "0":
        import logging

        logging.getLogger("evolora").warning(
            "fsdp_cpu_ram_efficient_loading is not built: every process loads the whole backbone, then "
            "keeps its shard of the decoder layers"
        )
    return plan


def sharded() -> bool:
    """Whether this launch shards the backbone's decoder layers (FSDP)."""
    return active() and _state.get("fsdp") is not None


def shard_layers(layers: list[torch.nn.Module], keep: set[torch.nn.Parameter]) -> tuple[int, int]:
    """FSDP: each of the frozen weights of `layers` is cut into one shard per process (PyTorch's
    `fully_shard`, the FSDP2 that accelerate's FSDP plugin runs), gathered for each forward and backward of
    its layer and freed after (FULL_SHARD; SHARD_GRAD_OP keeps it from the forward to the backward).
    `keep` (LoRA factors, trainable rows) stays whole in every process: it is small, strategies read and
    write it directly, and its gradients are summed as in DDP (`sum_gradients`); adapters added later are
    not sharded either. Returns (bytes of layer weights this process holds, bytes of all of them)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    total = sum(p.numel() * p.element_size() for layer in layers for p in layer.parameters())
    mesh = init_device_mesh(_state["device"].type, (world_size(),))
    for layer in layers:
        fully_shard(
            layer,
            mesh=mesh,
            reshard_after_forward=_state["fsdp"]["reshard_after_forward"],
            ignored_params={p for p in layer.parameters() if p in keep},
        )
    held = sum(
        p.to_local().numel() * p.element_size() if hasattr(p, "to_local") else p.numel() * p.element_size()
        for layer in layers
        for p in layer.parameters()
    )
    return held, total


def forwards_in_step(n: int) -> int:
    """Under FSDP every process must run the same number of forward passes (each one gathers every
    process's shards of the layers' weights): the most any process runs, given that this one runs n.
    n otherwise."""
    if not sharded():
        return n
    t = torch.tensor([float(n)], dtype=torch.float64)
    all_reduce_sum([t], op="max")
    return int(t.item())


def end() -> None:
    """Leave the launch's process group once every process has finished the run; what follows (the CLI's
    report) is the main process's alone."""
    if not active():
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    _state["world"] = 1


def world_size() -> int:
    return int(_state["world"])


def rank() -> int:
    return int(_state["rank"])


def active() -> bool:
    """Whether this run's work is split across processes."""
    return world_size() > 1


def is_main() -> bool:
    """The process that writes files, logs and shows progress (the only one without a launch)."""
    return rank() == 0


def device() -> torch.device | None:
    """This process's device in a launch (its GPU), else None."""
    return _state.get("device") if active() else None


def _solo() -> bool:
    return bool(getattr(_local, "solo", False))


def barrier() -> None:
    """Wait until every process gets here (nothing in one process, or inside `main_first`)."""
    if active() and not _solo():
        _trace("barrier")
        torch.distributed.barrier()


def _trace(what: str) -> None:
    """`EVOLORA_TRACE=/tmp/trace`: each process lists its collective calls in /tmp/trace.<rank>, where
    calls that fall out of step (a hang) can be compared."""
    if os.environ.get("EVOLORA_TRACE"):
        import traceback

        where = " < ".join(f"{f.name}:{f.lineno}" for f in traceback.extract_stack()[-9:-2][::-1])
        with open(f"{os.environ['EVOLORA_TRACE']}.{rank()}", "a") as f:
            f.write(f"{what} {where}\n")


def writes() -> bool:
    """Whether this process writes files (the main one)."""
    return is_main()


@contextlib.contextmanager
def one_writer() -> Iterator[bool]:
    """Around every write: yields whether this process writes (the main one). Every process waits before
    it, so none is still deciding from the files as they were (a slower one would otherwise see the new
    file, skip the write and fall out of step in the collective calls), and after it, so all read the new
    file."""
    barrier()
    yield writes()
    barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """The block runs in the main process first, then in the others (which find what it wrote); no
    collective call happens inside it."""
    if not active():
        yield
        return
    if not is_main():
        torch.distributed.barrier()
    _local.solo = True
    try:
        yield
    finally:
        _local.solo = False
    if is_main():
        torch.distributed.barrier()
    torch.distributed.barrier()  # everyone has finished the block


def share(n: int) -> slice:
    """This process's contiguous share of n rows (shares differ in size by at most one)."""
    bounds = np.linspace(0, n, world_size() + 1).round().astype(int)
    return slice(int(bounds[rank()]), int(bounds[rank() + 1]))


def all_reduce_sum(tensors: list[torch.Tensor], op: str = "sum") -> None:
    """Sum (or `op="max"`) each tensor over the processes, in place (one call per dtype and device)."""
    if not active() or not tensors:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    # NCCL reduces GPU tensors only: CPU ones (counts, flags) travel through this process's GPU
    via = _state["device"] if torch.distributed.get_backend() == "nccl" else None
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        flat = flat.to(via) if via is not None else flat
        _trace(f"all_reduce {op} {flat.numel()}")
        reduce_op = torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM
        torch.distributed.all_reduce(flat, op=reduce_op)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum the parameters' gradients over the processes (a gradient no process computed stays None, as in
    one process, so the optimiser skips it there too); merge the gradient-free ones (below)."""
    if not active():
        return
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
    all_reduce_sum([present])
    grads = []
    for p, n in zip(params, present.tolist(), strict=True):
        if n and p.grad is None:
            p.grad = torch.zeros_like(p)
        if n:
            grads.append(p.grad)
    all_reduce_sum(grads)
    # Parameters no process has a gradient for but which training changes all the same (a conventional
    # model's `seen` masks, set for the rows each process trains on) are merged by maximum: a row marked
    # by any process is marked. Unchanged parameters are equal everywhere, and stay so.
    with torch.no_grad():
        all_reduce_sum([p.data for p, n in zip(params, present.tolist(), strict=True) if not n], op="max")


def sum_number(value: float) -> float:
    """A float summed over the processes."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    all_reduce_sum([t])
    return float(t.item())


def gather(obj: Any) -> list[Any]:
    """Every process's `obj`, in process order, on every process."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def split_rows(method: F) -> F:
    """For a task's `predict(self, lm, rows, ...)`: in a launch, each process predicts its share of the rows
    and every process gets all the predictions, in row order (through the task's save/load_predictions)."""
    import functools

    @functools.wraps(method)
    def wrapper(task: Any, lm: Any, rows: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        # Under FSDP every process predicts all the rows: the forward passes stay in step, which each
        # layer's weight gathering needs, at the cost of one process's evaluation time.
        if not active() or sharded() or getattr(_local, "inside", False) or len(rows) < world_size():
            return method(task, lm, rows, *args, **kwargs)
        _local.inside = True
        try:
            mine = method(task, lm, rows[share(len(rows))], *args, **kwargs)
        finally:
            _local.inside = False
        parts = gather(task.save_predictions(mine))
        return task.load_predictions({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})

    return wrapper  # type: ignore[return-value]
