"""The gradient all-reduce of workers that share one machine's CPUs, through shared memory.

gloo all-reduces over TCP, even on loopback: on a 2-core machine it moved the model's 3.2 MB of
gradients in about 5 ms of a 43 ms step (docs/results.md, "Where the step time goes"). Workers
on one machine can instead meet in one shared-memory file: each copies its gradients into its own
slot, says so, waits until every worker has, and sums every slot in rank order. Each worker
computes the same sum in the same order, so all hold the same gradients, as after gloo. It is a
DDP communication hook, so DDP still owns the buckets, the parameters' broadcast at the start and
the hooks on backward.

Layout of the file: one 64-byte line per worker holding its counter (an int64), then one slot per
worker as large as all the model's gradients (any bucket fits). Each all-reduce ``k`` (counted alike on every worker):

    write: wait until every counter >= 2k      (every worker has read call k-1's slots)
           my bucket / world into my slot, counter = 2k + 1
    read:  wait until every counter >= 2k + 1  (every slot holds call k's gradients)
           sum the slots in rank order, counter = 2k + 2

A worker writes its counter only after its slot, and reads slots only after every counter; x86
keeps stores in order and loads in order, so that is enough there. Elsewhere (and between
machines, and on GPUs, where NCCL is the way) gloo's hook stays.
"""

from __future__ import annotations

import mmap
import os
import platform
import socket
import time
import uuid
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from lstmgen import steptime
from lstmgen.errors import LstmgenError

SHM = "/dev/shm"
LINE = 64  # bytes per counter: each worker's counter on its own cache line
WAIT_TIMEOUT_S = 1800.0  # gloo's own default; Ray Train ends a group whose worker died long before


class SharedMemoryAllReduce:
    """Sums float32 tensors across the ``world`` workers that opened the same file."""

    def __init__(self, path: str, rank: int, world: int, slot_bytes: int, create: bool,
                 timeout_s: float = WAIT_TIMEOUT_S) -> None:
        self.path, self.rank, self.world, self.slot_bytes, self.timeout_s = path, rank, world, slot_bytes, timeout_s
        self.calls = 0
        size = LINE * world + slot_bytes * world
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self.mem = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.counters = np.ndarray((world,), dtype=np.int64, buffer=self.mem, offset=0, strides=(LINE,))
        self.slots = torch.frombuffer(self.mem, dtype=torch.float32, offset=LINE * world,
                                      count=slot_bytes * world // 4).view(world, -1)

    def __call__(self, flat: torch.Tensor, divisor: int = 1) -> torch.Tensor:
        """``flat`` (float32, contiguous) becomes the sum over workers of ``flat / divisor``, in
        place. DDP's own hook divides by the world size before it sums too; here the division
        is the copy into the slot, so averaging costs no pass of its own over the gradients."""
        n, k = flat.numel(), self.calls
        if n * 4 > self.slot_bytes:
            raise LstmgenError(f"all-reduce of {n * 4} bytes over a {self.slot_bytes}-byte shared slot")
        self._wait_all(2 * k)
        torch.div(flat, divisor, out=self.slots[self.rank, :n])  # a copy when divisor is 1 (exact), as fast
        self.counters[self.rank] = 2 * k + 1
        self._wait_all(2 * k + 1)
        torch.add(self.slots[0, :n], self.slots[1, :n], out=flat)  # every worker: the same sum, in rank order
        for r in range(2, self.world):
            flat.add_(self.slots[r, :n])
        self.counters[self.rank] = 2 * k + 2
        self.calls += 1
        return flat

    def _wait_all(self, at_least: int) -> None:
        spins, start = 0, 0.0
        while self.counters.min() < at_least:
            spins += 1
            if spins > 1000:  # a short spin catches a worker that is nearly there; then give way
                start = start or time.monotonic()
                time.sleep(0 if spins < 20000 else 0.0002)
                if time.monotonic() - start > self.timeout_s:
                    raise LstmgenError(f"gradient all-reduce: a worker did not arrive in {self.timeout_s:g} s")

    def close(self) -> None:
        del self.slots, self.counters
        self.mem.close()


def _machine() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return socket.gethostname() + ":" + f.read().strip()


def usable(device: torch.device, nbytes: int = 0) -> bool:
    """Shared memory can replace gloo here: CPU training on x86-64 Linux, with room in /dev/shm
    (a container's is often 64 MB; a write past its end would kill the worker)."""
    if device.type != "cpu" or platform.machine() not in ("x86_64", "AMD64") or not os.path.isdir(SHM):
        return False
    room = os.statvfs(SHM)
    return room.f_bavail * room.f_frsize >= 2 * nbytes


def gradient_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad) * 4


def open_group(model: torch.nn.Module, rank: int, world: int) -> SharedMemoryAllReduce:
    """Rank 0 creates the file (a fresh name each time a worker group starts), every worker
    opens it, then it is unlinked at once: no file is left behind, however the workers end."""
    slot_bytes = gradient_bytes(model)
    name = [f"{SHM}/lstmgen-allreduce-{uuid.uuid4().hex}" if rank == 0 else None]
    dist.broadcast_object_list(name, src=0)
    if rank == 0:
        reducer = SharedMemoryAllReduce(name[0], rank, world, slot_bytes, create=True)
    dist.barrier()
    if rank != 0:
        reducer = SharedMemoryAllReduce(name[0], rank, world, slot_bytes, create=False)
    dist.barrier()
    if rank == 0:
        os.unlink(name[0])
    return reducer


def gradient_allreduce(model: torch.nn.Module, device: torch.device, rank: int, world: int) -> Callable | None:
    """The function that sums a bucket of gradients across workers, when shared memory can: None
    leaves DDP's own (gloo or NCCL). Every worker decides alike: only when all of them are on one
    machine (host name and boot id, gathered from every worker)."""
    if world < 2:
        return None
    ok = usable(device, (LINE + gradient_bytes(model)) * world)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (ok, _machine() if ok else ""))
    if not all(able and where == everyone[0][1] for able, where in everyone):
        return None  # some worker on another machine, a GPU, or not x86-64
    return open_group(model, rank, world)


def register(model: torch.nn.Module, reduce: Callable[[torch.Tensor, int], torch.Tensor] | None, world: int,
             clock: steptime.StepClock | None = None) -> None:
    """DDP's communication hook: each bucket averaged over the workers as DDP's default hook
    does it (divided by the world size, then summed), by ``reduce`` (None: gloo's or NCCL's
    all-reduce). With the step clock timing every part, the hook also laps it: the backward's
    compute before it, the wait for the slowest worker (a one-number all-reduce), then the
    transfer. Otherwise, with no ``reduce``, DDP keeps its own hook, which overlaps the
    all-reduce with the backward where a GPU can."""
    timed = clock is not None and clock.timing
    if not hasattr(model, "register_comm_hook") or (reduce is None and not timed):
        return
    average = reduce or _average

    def hook(_state, bucket):
        buffer = bucket.buffer()
        if timed:
            clock.lap("backward")
            dist.all_reduce(torch.zeros(1, device=buffer.device))  # waits for the slowest worker
            clock.lap("allreduce wait")
        average(buffer, world)
        if timed:
            clock.lap("allreduce")
        future: torch.futures.Future = torch.futures.Future()
        future.set_result(buffer)
        return future

    model.register_comm_hook(None, hook)


def _average(flat: torch.Tensor, world: int) -> torch.Tensor:
    dist.all_reduce(flat.div_(world))
    return flat
