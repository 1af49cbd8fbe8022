"""Data parallel: the same :func:`~minipeft.train` loop on ``world`` processes, the gradients all-reduced by DDP.

Every process (a *rank*) holds a whole copy of the model. At each step all ranks draw the same batch and
each trains on its rows of it (every ``world``-th row; ``train`` does this when the model is wrapped in
``DistributedDataParallel``). During ``backward`` DDP sums the gradients over the ranks and divides by
``world``, bucket by bucket, so every copy takes the same step: the step one process takes on the whole
batch. DDP all-reduces only the gradients of parameters that require them: with PEFT, the adapters'.

A communication hook counts what DDP hands to all-reduce (the bytes of each bucket of gradients), then
runs DDP's default all-reduce; a ring all-reduce of ``S`` bytes over ``N`` workers sends and receives
``2 (N - 1) / N x S`` bytes per worker. CPU only: the gloo backend, one thread per process, for teaching.

    run = mp.train_data_parallel(mp.add_lora(mp.load_base(), r=8), task, world=2, steps=100, lr=1e-2)
    run.bytes_per_step[0]      # = 4 x the trainable parameters (fp32 gradients), on each rank

Runs made here do not go through the results cache.
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from .common import integer, module, positive_float, positive_int
from .train import History, train


@dataclass
class DataParallelRun:
    """What :func:`train_data_parallel` measured (the trained tensors are loaded into the model)."""
    history: History              # rank 0's: the loss of the whole batch at every step
    bytes_per_step: list[int]     # gradient bytes handed to all-reduce at each step, by each rank
    buckets_per_step: list[int]   # how many all-reduce calls (DDP buckets) carried them
    world: int

    def __repr__(self):
        return (f"DataParallelRun(world={self.world}, steps={len(self.bytes_per_step)}, "
                f"all-reduce {self.bytes_per_step[0]:,} bytes a step in {self.buckets_per_step[0]} bucket(s), "
                f"final_loss={self.history.loss[-1]:.4f})")


class ByteCounter:
    """The hook's state: bytes and buckets of the step in progress, then one total per step."""
    def __init__(self, process_group=None):
        self.process_group = process_group
        self.bytes_per_step, self.buckets_per_step = [], []
        self._bytes = self._buckets = 0


def counting_allreduce(state, bucket):  # no annotations: DDP checks them, and they are strings here
    """A DDP communication hook: count the bucket's bytes, then DDP's default all-reduce (sum / world).

    ``state`` is a :class:`ByteCounter`, ``bucket`` a ``dist.GradBucket``; returns DDP's future."""
    state._bytes += bucket.buffer().numel() * bucket.buffer().element_size()
    state._buckets += 1
    if bucket.is_last():  # the step's last bucket: close the step's count
        state.bytes_per_step.append(state._bytes)
        state.buckets_per_step.append(state._buckets)
        state._bytes = state._buckets = 0
    return allreduce_hook(state.process_group, bucket)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, folder, timeout):
    """One rank: join the group, wrap its copy of the model in DDP with the counting hook, ``train``;
    rank 0 writes the result into ``folder`` (files, not pipes: a large write to a pipe whose reader has
    died can block the writer for ever)."""
    torch.set_num_threads(1)
    if rank:  # the course's step count (MINIPEFT_STEP_LOG) counts each step once
        os.environ.pop("MINIPEFT_STEP_LOG", None)
    job = torch.load(os.path.join(folder, "job.pt"), weights_only=False)  # this rank's own copy of the model
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout))
    try:
        model = job["model"]
        ddp = DistributedDataParallel(model)
        counter = ByteCounter()
        ddp.register_comm_hook(counter, counting_allreduce)
        history = train(ddp, job["task"], device="cpu", progress=False, **job["kwargs"])
        if rank == 0:
            trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
            torch.save({"history": asdict(history), "tensors": trained, "bytes": counter.bytes_per_step,
                        "buckets": counter.buckets_per_step}, os.path.join(folder, "result.pt"))
    finally:
        dist.destroy_process_group()


def train_data_parallel(model: torch.nn.Module, task, world: int = 2, *, steps: int = 400, lr: float = 1e-3,
                        batch_size: int = 32, seed: int = 0, warmup: int | None = None,
                        weight_decay: float = 0.0, timeout: float = 300.0) -> DataParallelRun:
    """Train ``model`` in place on ``world`` CPU processes (gloo), with DDP, through :func:`minipeft.train`.

    Each rank gets a copy of ``model`` (pickled: its classes must be importable) and trains on its
    ``batch_size / world`` rows of every batch; the trained tensors (the same on every rank) are loaded
    back into ``model``. Returns the whole batch's losses and the bytes all-reduced at each step. A run
    that has not finished after ``timeout`` seconds is stopped (its processes ended) with ``TimeoutError``.
    From a script, call it under ``if __name__ == "__main__":`` (the processes are spawned).
    """
    module("model", model)
    world, timeout = positive_int("world", world), float(positive_float("timeout", timeout))
    if integer("batch_size", batch_size, 1) < world:
        raise ValueError(f"batch_size {batch_size} is smaller than world={world}: every rank needs a row a step")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters (apply a method or full_finetune first)")
    kwargs = dict(steps=steps, lr=lr, batch_size=batch_size, seed=seed, warmup=warmup, weight_decay=weight_decay)
    with tempfile.TemporaryDirectory(prefix="minipeft-ddp-") as folder:
        torch.save({"model": model, "task": task, "kwargs": kwargs}, os.path.join(folder, "job.pt"))
        threads = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"  # the workers inherit it: one thread each
        try:
            workers = torch.multiprocessing.start_processes(_worker, args=(world, _free_port(), folder, timeout),
                                                            nprocs=world, join=False, start_method="spawn")
        finally:
            os.environ.pop("OMP_NUM_THREADS") if threads is None else os.environ.update(OMP_NUM_THREADS=threads)
        deadline = time.monotonic() + timeout
        try:
            while not workers.join(timeout=0.2):  # True once all have exited; raises if one failed
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the {world} data-parallel processes did not finish in {timeout:g} s")
        finally:
            for process in workers.processes:  # still running only after a failure or the timeout
                if process.is_alive():
                    process.kill()
                    process.join()
        result = torch.load(os.path.join(folder, "result.pt"), weights_only=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(result["tensors"][name])
    model.eval()
    return DataParallelRun(History(**result["history"]), result["bytes"], result["buckets"], world)
