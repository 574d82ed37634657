"""The bottom floor of training, inference and evaluation: device, precision, autocast, processes, RNG state.

Nothing here knows about models or data, so every layer above may import it. Each precision word
has one meaning (config.PRECISION_HELP), resolved here into a `PrecisionPlan` that training and
inference both read.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch

from captioner.config import DEVICES, PRECISIONS
from captioner.errors import ConfigError

T = TypeVar("T")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

def resolve_device(name: str) -> torch.device:
    """auto -> cuda, then mps, then cpu; an explicit device that is not there is an error."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if has_mps else "cpu")
    if (name == "cuda" or name.startswith("cuda:")) and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available")
    if name == "mps" and not has_mps:
        raise ConfigError("--device mps: no MPS device is available")
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    return torch.device(name)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU runs bf16 matrix products faster than float32; read from /proc/cpuinfo (Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return bf16_is_faster(f.read(1 << 16))  # the first core's entry is enough
    except OSError:
        return False


def bf16_is_faster(cpuinfo: str) -> bool:
    """Whether a CPU described by /proc/cpuinfo text multiplies bf16 faster than float32.

    AMX (Intel since Sapphire Rapids) does; so does AVX512-BF16 on AMD (Zen 4 on; measured on an EPYC: bf16
    autocast trained the matched size at ~1.7-2x float32's images/s). An Intel CPU with AVX512-BF16 but no
    AMX does not: oneDNN's bf16 products ran slower than float32 on one (a matched-size training step 1.37x
    slower, the encoder 1.36x; benchmarks/NOTES.md, "bf16 without AMX"), so `auto` keeps float32 there.
    """
    vendor = flags = ""
    for line in cpuinfo.splitlines():
        if line.startswith("vendor_id") and not vendor:
            vendor = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = line.split(":", 1)[1]
    names = set(flags.split())
    return "amx_bf16" in names or ("avx512_bf16" in names and vendor == "AuthenticAMD")


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The dtype a precision word names on `device` (config.PRECISION_HELP); auto picks bf16 where it is native."""
    if name == "auto":
        native = (device.type == "cuda" and torch.cuda.is_bf16_supported()) or \
                 (device.type == "cpu" and cpu_has_native_bf16())
        return torch.bfloat16 if native else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA device (use bf16 or fp32 on this device)")
    return DTYPES[name]


@dataclass(frozen=True)
class PrecisionPlan:
    """What runs in which dtype, for one precision word on one device (config.PRECISION_HELP in words)."""

    dtype: torch.dtype  # the reduced type, or float32

    @property
    def train_autocast(self) -> torch.dtype:
        """Autocast dtype of training's forward passes (weights stay float32)."""
        return self.dtype

    @property
    def encoder(self) -> torch.dtype:
        """Dtype the encoder's weights are stored in at inference (compute-bound at every batch size)."""
        return self.dtype

    @property
    def decoder(self) -> torch.dtype:
        """Dtype of the decoder at inference: float32, since a decoding step is bound by reading weights."""
        return torch.float32

    @property
    def name(self) -> str:
        """The short word for the dtype (fp32, bf16, fp16)."""
        return {v: k for k, v in DTYPES.items()}[self.dtype]


def precision_plan(name: str, device: torch.device) -> PrecisionPlan:
    """Resolve a precision word (auto, fp32, bf16, fp16) on `device` into its plan."""
    return PrecisionPlan(resolve_precision(name, device))


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """The mixed-precision context for forward passes (a no-op for fp32)."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Dist:
    """Where this process stands in a torchrun job (world 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Only the main process writes files and reports."""
        return self.rank == 0


def init_distributed(device_name: str) -> Dist:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); a no-op when run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist  # only under torchrun: a single process never pays for it

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)  # before the group forms, so NCCL binds each rank to its own GPU
    if not dist.is_initialized():
        # Rank 0 scores validation and writes checkpoints while the others wait in a collective: give
        # that wait far longer than NCCL's default 10 minutes, so a big validation set never times out.
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(hours=2))
    return Dist(rank, world, local_rank)


def close_distributed(dist_info: Dist) -> None:
    """Wait for every rank, then leave the process group (a no-op when run alone)."""
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


@contextmanager
def main_first(dist_info: Dist) -> Iterator[None]:
    """Run the block on the main process first, then on the others (a download into a cache they share)."""
    if dist_info.world > 1 and not dist_info.main:
        _barrier()
    yield
    if dist_info.world > 1 and dist_info.main:
        _barrier()


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def all_mean(value: float, dist_info: Dist, device: torch.device) -> float:
    """Average a scalar over all processes (the tensor lives on `device`: NCCL reduces only CUDA tensors)."""
    if dist_info.world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float32, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist_info.world


def any_rank(flags: list[bool], dist_info: Dist, device: torch.device) -> list[bool]:
    """Each flag OR-ed over all processes, so every rank takes a stop decision at the same step."""
    if dist_info.world == 1:
        return list(flags)
    import torch.distributed as dist

    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def from_main(obj: T, dist_info: Dist) -> T:
    """The main process's `obj` on every process (what only rank 0 computed, such as a validation record)."""
    if dist_info.world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def to_main(obj: T, dist_info: Dist) -> list[T] | None:
    """Every process's `obj`, in rank order, on the main process; None on the others."""
    if dist_info.world == 1:
        return [obj]
    import torch.distributed as dist

    gathered: list[T] | None = [None] * dist_info.world if dist_info.main else None  # type: ignore[list-item]
    dist.gather_object(obj, gathered, dst=0)
    return gathered


# ----------------------------------------------------------------------------- random state


def rng_state() -> dict[str, torch.Tensor]:
    """The CPU and every CUDA device's generator state (saved in checkpoints for an exact resume)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore what `rng_state` returned (devices it does not mention keep theirs)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda{i}" in state:
                torch.cuda.set_rng_state(state[f"cuda{i}"], i)
