"""Where a command-line run goes: its device, its place in a ``torchrun`` launch, and the memory free there.

* :func:`resolve_device`: ``cpu`` / ``cuda`` / ``cuda:N`` / ``auto`` -> a ``torch.device`` (``auto`` is CUDA
  when available, else CPU; under torchrun ``cuda`` is ``cuda:LOCAL_RANK``).
* :class:`Launch`: ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` as torchrun sets them, the default process
  group (gloo on CPU, NCCL on CUDA) for the duration of a ``with`` block, and the data shard of this process
  (every ``WORLD_SIZE``-th batch from ``RANK``).
* :func:`free_memory`: bytes free for new tensors on a device.

torch is imported inside the functions, so importing this module (from the CLI) costs nothing.
"""

from __future__ import annotations

import os


def rank0() -> bool:
    """True in a single process and in rank 0 of a torchrun launch (``RANK`` unset or 0)."""
    return int(os.environ.get("RANK", "0")) == 0


def resolve_device(spec: str, local_rank: int | None = None):
    """``torch.device`` for ``cpu`` / ``cuda`` / ``cuda:N`` / ``auto`` (CUDA when available, else CPU).

    Under torchrun (``local_rank`` given) ``cuda`` means ``cuda:LOCAL_RANK`` and an explicit ``cuda:N`` is
    refused (every process would share one GPU). Raises ``ValueError`` for another device type, for CUDA
    without a GPU, and for an index past the GPUs present.
    """
    import torch

    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise ValueError(f"device {spec!r}: {e}; expected cpu, cuda, cuda:N or auto") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {spec!r}: expected cpu, cuda, cuda:N or auto")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec}: CUDA is not available (torch {torch.__version__}); use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if local_rank is not None:
            if device.index is not None:
                raise ValueError(f"device {spec} under torchrun: pass cuda, each process takes cuda:LOCAL_RANK")
            device = torch.device("cuda", local_rank)
    return device


class Launch:
    """This process's place in a ``torchrun`` launch, its device, and the process group (a context manager).

    ``world`` / ``rank`` / ``local_rank`` come from ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` (1 / 0 / 0 when
    unset). On enter with ``world > 1`` the default process group is initialised from torchrun's environment
    (``MASTER_ADDR`` / ``MASTER_PORT``; gloo for CPU, NCCL for CUDA, after ``torch.cuda.set_device``); on exit
    it is destroyed, also after an error.
    """

    def __init__(self, device: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(device, self.local_rank if self.world > 1 else None)

    def __enter__(self) -> Launch:
        if self.world > 1:
            import torch
            import torch.distributed as dist

            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        return self

    def __exit__(self, *exc) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def shard(self, batches: list) -> list:
        """Every ``world``-th batch, starting at ``rank`` (all of them in a single process). Raises
        ``ValueError`` when there are fewer batches than processes (a process without data cannot reduce)."""
        if len(batches) < self.world:
            raise ValueError(f"{len(batches)} batches for {self.world} processes: every process needs at least "
                             "one; add data, lower the batch size, or launch fewer processes")
        return batches[self.rank :: self.world]


def free_memory(device) -> int | None:
    """Bytes free for new tensors on ``device``: ``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable`` of
    ``/proc/meminfo`` on CPU; ``None`` when it cannot be read (the caller says so; nothing is assumed)."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
