"""Where a model runs and in which precision, and the regions that must not run in reduced precision.

`precision: auto` is bf16 on a GPU that supports it, bf16-mixed on a CPU with native bf16 (AVX512-BF16 or
AMX) and fp32 elsewhere. Under bf16-mixed the model's matrix products run in bf16 inside `LoraLM.autocast()`;
computations whose result must not carry bf16 rounding (input covariances and their eigenvectors, the
proximal and orthogonality terms, normalisations, RQ-VAE) run inside `without_autocast()` in fp32 or fp64,
whatever the run's precision.

`fp16` is for CUDA GPUs without bf16 (V100, T4): fp16 weights, fp16 autocast, and loss scaling in the
trainer. `model.quantization` (QLoRA through bitsandbytes) needs CUDA and bitsandbytes too; `check_machine`
checks both when a run or an update starts, so it fails before any work (the config itself loads anywhere:
a GPU run's folder can be read on a laptop).

On a CPU, `warn_if_cores_busy` says when the run's torch threads share cores with other busy processes.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from evolora.errors import ConfigError, EvoloraError, warn_once

log = logging.getLogger("evolora.models")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise EvoloraError(f"model.device={name!r} is not a device (try cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvoloraError(f"model.device={name!r} but no CUDA device is available here")
    return dev


#: Set to 1 or 0 to override the CPU detection below (what `precision: auto` picks on a CPU), e.g. to run
#: the test suite as it runs on the other kind of CPU.
CPU_BF16_ENV = "EVOLORA_CPU_BF16"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX); `$EVOLORA_CPU_BF16`
    (1 or 0) overrides the detection.

    Elsewhere oneDNN emulates bf16 products, and bf16 autocast runs many times slower than fp32 (an AVX2
    EPYC took minutes where fp32 took seconds).
    """
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise EvoloraError(f"${CPU_BF16_ENV}={forced!r}: use 1 (native bf16) or 0 (none), or unset it")
    flags = cpu_info()[1]
    return "avx512_bf16" in flags or "amx_bf16" in flags


#: CPU extensions that decide which kernels run: vector width (and so the rounding of fp32 sums), native bf16
_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


@functools.cache
def cpu_info() -> tuple[str, frozenset[str]]:
    """This CPU's model name and feature flags, read once from /proc/cpuinfo (elsewhere: the platform's
    processor name and no flags, so native bf16 is not assumed)."""
    import platform

    name, flags = platform.processor() or platform.machine(), frozenset[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                name = value.strip()
            elif key.strip() == "flags":
                flags = frozenset(value.split())
    except OSError:
        pass
    return name, flags


@functools.cache
def machine() -> str:
    """The machine in a few words, e.g. "AMD EPYC 7B13 (avx2)" or "... + NVIDIA H200": recorded with each run
    and each stage, because the same fp32 run rounds differently on CPUs with other vector extensions (a
    run resumed on another machine continues correctly, but not bit for bit as it would have)."""
    name, flags = cpu_info()
    isa = [f for f in _ISA_FLAGS if f in flags]
    out = f"{name} ({', '.join(isa)})" if isa else name
    if torch.cuda.is_available():
        out += " + " + torch.cuda.get_device_name(0)
    return out


def _cuda_problem(device: str) -> str | None:
    """Why `model.device` does not name a CUDA device on this machine (None: it does)."""
    if device != "auto" and not device.startswith("cuda"):
        return f"model.device is {device}"
    if not torch.cuda.is_available():
        return "this machine has no CUDA GPU"
    return None


#: the advice where a run's settings cannot change (an update continues the run as it was trained)
ON_A_GPU = "the run was trained so, and an update keeps its settings: update it on a machine with a CUDA GPU"


def fp16_unavailable(device: str, advice: str | None = None) -> str | None:
    """Why `precision: fp16` cannot run on `device` here, as a message for the user (None: it can);
    `advice` replaces the settings to use instead where they cannot change (`ON_A_GPU`)."""
    problem = _cuda_problem(device)
    if problem is None:
        return None
    return (
        f"model.precision=fp16 (fp16 autocast with loss scaling) is for CUDA GPUs without bf16, and "
        f"{problem}: fp16 autocast gains nothing on a CPU. "
        + (advice or "Use fp32, or bf16-mixed on a CPU with native bf16")
    )


def bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def quantization_unavailable(quantization: str, device: str, advice: str | None = None) -> str | None:
    """Why `model.quantization` (QLoRA) cannot run on `device` here, as a message (None: it can); `advice`
    as `fp16_unavailable`'s."""
    if quantization == "none":
        return None
    problem = _cuda_problem(device)
    if problem is None and not bitsandbytes_installed():
        problem = "the bitsandbytes package is not installed (pip install 'evolora[qlora]')"
    if problem is None:
        return None
    return (
        f"model.quantization={quantization} (QLoRA through bitsandbytes) needs a CUDA GPU and the "
        f"bitsandbytes package, and {problem}. " + (advice or "Use model.quantization: none here")
    )


def check_machine(precision: str, quantization: str, device: str, advice: str | None = None) -> None:
    """A ConfigError when this machine cannot run `model.precision` / `model.quantization` on `device`;
    `advice` replaces the settings to use instead where they cannot change (`ON_A_GPU`)."""
    problem = quantization_unavailable(quantization, device, advice)
    if problem is None and precision == "fp16":
        problem = fp16_unavailable(device, advice)
    if problem:
        raise ConfigError(problem)


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype, bool]:
    """-> (weight dtype, use autocast): autocast in bf16, or in fp16 when the weights are fp16.

    `auto`: bf16 weights on a GPU that supports them; on a CPU, bf16-mixed where the CPU has native bf16
    and fp32 elsewhere. `fp16` (CUDA only): fp16 weights under fp16 autocast.
    """
    if precision == "fp16":
        problem = fp16_unavailable(str(device))
        if problem:
            raise ConfigError(problem)
        return torch.float16, True
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        else:
            precision = "bf16-mixed" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    emulated = precision in ("bf16", "bf16-mixed") and device.type == "cpu" and not cpu_has_native_bf16()
    if emulated:
        warn_once(
            log,
            "emulated bf16",
            "model.precision=%s on a CPU without native bf16 (no AVX512-BF16/AMX): bf16 products are "
            "emulated and run many times slower than fp32; use precision: auto or fp32",
            precision,
        )
    if precision == "fp32":
        return torch.float32, False
    if precision == "bf16":
        return torch.bfloat16, False
    return torch.float32, True  # bf16-mixed


def autocast_dtype_of(dtype: torch.dtype, mixed: bool) -> torch.dtype | None:
    """The autocast dtype of a `resolve_precision` result (None: no autocast)."""
    if not mixed:
        return None
    return torch.float16 if dtype == torch.float16 else torch.bfloat16


def precision_name(precision: str, device: torch.device) -> str:
    """What `precision` (possibly `auto`) means on `device`: fp32, bf16, bf16-mixed or fp16."""
    dtype, mixed = resolve_precision(precision, device)
    if dtype == torch.float16:
        return "fp16"
    return "bf16-mixed" if mixed else "bf16" if dtype == torch.bfloat16 else "fp32"


_BUSY_SAMPLE: dict[str, float] = {}  # the last measurement: runs started within a minute share it


def cores_busy_elsewhere(window: float = 0.25, reuse_for: float = 60.0) -> float | None:
    """How many of this process's cores other processes keep busy now: the busy time of those CPUs in
    /proc/stat over `window` seconds, less this process's own; None where /proc/stat cannot be read (not
    Linux). A measurement is reused for `reuse_for` seconds, so many runs in one process pay it once."""
    taken = _BUSY_SAMPLE.get("at")
    if taken is not None and time.monotonic() - taken < reuse_for:
        return _BUSY_SAMPLE["busy"]
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        busy0, own0, start = _busy_ticks(cpus), os.times(), time.monotonic()
        time.sleep(window)
        busy1, own1, end = _busy_ticks(cpus), os.times(), time.monotonic()
    except (OSError, ValueError):
        return None
    own = (own1.user + own1.system) - (own0.user + own0.system)
    busy = max(0.0, ((busy1 - busy0) / os.sysconf("SC_CLK_TCK") - own) / (end - start))
    _BUSY_SAMPLE.update(at=end, busy=busy)
    return busy


def _busy_ticks(cpus: set[int] | None) -> int:
    """Clock ticks the CPUs in `cpus` (all: None) spent on anything but idling or waiting for I/O."""
    ticks = 0
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu":
                continue
            if cpus is None or int(name[3:]) in cpus:
                user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
                ticks += user + nice + system + irq + softirq + steal
    return ticks


@contextlib.contextmanager
def without_autocast() -> Iterator[None]:
    """Run the block in the tensors' own dtypes even inside a bf16 autocast region (CPU and CUDA)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield


def warn_if_cores_busy() -> None:
    """Warn when the torch threads outnumber the cores other processes leave free: torch's threads wait for
    each other at every operation, so one on a busy core holds back all of them and a run can take several
    times as long. Busy means busy for the last minute (the load average) and still busy now
    (`cores_busy_elsewhere`): the load average alone counts work that just ended (the command before, or
    this process's own data preparation). Silent on GPU machines and with one thread."""
    threads = torch.get_num_threads()
    if threads < 2 or torch.cuda.is_available() or not hasattr(os, "getloadavg"):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0]
    if load + threads > cores + 0.5:
        now = cores_busy_elsewhere()
        load = load if now is None else min(load, now)
    if load + threads > cores + 0.5:
        free = max(1, round(cores - load))
        log.warning(
            "%d torch threads on %d cores while other work keeps about %.1f of them busy: "
            "threads on a busy core hold back the others at every step, which can make this run several "
            "times slower; set threads: %d (--set threads=%d) or free the cores",
            threads, cores, load, free, free,
        )  # fmt: skip
