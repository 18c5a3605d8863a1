"""The shared-memory gradient all-reduce: two real processes joined by gloo, the sums against
gloo's own, the race between a fast and a slow worker forced, and DDP's gradients with the hook
against DDP's without."""

import json
import os
import time

import pytest
import torch
import torch.distributed as dist

from lstmgen import allreduce
from lstmgen.errors import LstmgenError

pytestmark = pytest.mark.skipif(not allreduce.usable(torch.device("cpu")), reason="shared memory all-reduce: x86-64 Linux only")


class SlowReader(allreduce.SharedMemoryAllReduce):
    """Rank 1 dawdles after every slot is written, before it reads them: a rank 0 that did not
    wait for it would write its next bucket over the one rank 1 is about to sum."""

    def _wait_all(self, at_least: int) -> None:
        super()._wait_all(at_least)
        if self.rank == 1 and at_least % 2 == 1:
            time.sleep(0.01)


def _two_workers(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    path = f"{out}/slots"
    if rank == 0:
        slow = SlowReader(path, 0, 2, 4 * 60_200, create=True)
    dist.barrier()
    if rank == 1:
        slow = SlowReader(path, 1, 2, 4 * 60_200, create=False)
    same, reference = [], []
    for call in range(40):  # no other collective in between: nothing but the protocol keeps the workers in step
        n = 60_200 - 1000 * (call % 7)  # buckets of different sizes, as DDP's first step and later ones
        each = [torch.randn(n, generator=torch.Generator().manual_seed(1000 * call + r)) for r in (0, 1)]
        if rank == 0 and call % 3 == 0:
            time.sleep(0.01)  # rank 0 late to write, too
        if call % 2:  # the sum, and the average as DDP's default hook takes it (divided, then summed)
            got, want = slow(each[rank].clone()), each[0] + each[1]
        else:
            got, want = slow(each[rank].clone(), 2), each[0] / 2 + each[1] / 2
        same.append(bool(torch.equal(got, want)))  # what gloo's all-reduce gives two workers
        reference.append(float(got.sum()))
    # DDP with the hook against DDP without, the same model and data on each rank
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50))
    plain = torch.nn.parallel.DistributedDataParallel(base)
    hooked_model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50))
    hooked_model.load_state_dict(base.state_dict())
    hooked = torch.nn.parallel.DistributedDataParallel(hooked_model, gradient_as_bucket_view=True)
    reduce = allreduce.gradient_allreduce(hooked_model, torch.device("cpu"), rank, 2)
    assert isinstance(reduce, allreduce.SharedMemoryAllReduce)  # both workers on this machine's CPUs
    dist.barrier()  # rank 0 unlinks the file once every worker has opened it
    assert reduce.path.startswith("/dev/shm/") and not os.path.exists(reduce.path)
    allreduce.register(hooked, reduce, 2)
    x = torch.randint(0, 50, (32,), generator=torch.Generator().manual_seed(rank))
    for ddp in (plain, hooked):
        torch.nn.functional.cross_entropy(ddp(x), x).backward()
    grads_equal = all(torch.equal(a.grad, b.grad) for a, b in zip(base.parameters(), hooked_model.parameters()))
    reduce.close()
    slow.close()
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump({"same": same, "sums": reference, "ddp": grads_equal}, f)
    dist.destroy_process_group()


def test_two_workers_sum_as_gloo_does_with_a_slow_worker_forced(tmp_path):
    port = 29900 + os.getpid() % 90
    torch.multiprocessing.spawn(_two_workers, args=(port, str(tmp_path)), nprocs=2)
    got = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert all(got[0]["same"]) and all(got[1]["same"])  # every call: gloo's sum, bit for bit
    assert got[0]["sums"] == got[1]["sums"]  # both ranks hold the same gradients
    assert got[0]["ddp"] and got[1]["ddp"]  # DDP's averaged gradients, hook or not


def test_a_worker_that_never_arrives_is_an_error_not_a_hang(tmp_path):
    path = str(tmp_path / "slots")
    reduce = allreduce.SharedMemoryAllReduce(path, 0, 2, 4096, create=True, timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(LstmgenError, match="did not arrive"):
        reduce(torch.ones(10))
    assert time.monotonic() - start < 5
    with pytest.raises(LstmgenError, match="over a 4096-byte"):
        reduce(torch.ones(2000))
    reduce.close()
