"""Distributed set-up for ``train`` and ``distill``: one process per device, launched by ``torchrun``.

``init_distributed`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and starts a
process group: NCCL when the process drives a GPU, gloo on CPUs. Without those variables everything here
degrades to a single process (rank 0 of 1), so the same training code runs with and without torchrun.

``ShardedEpochSampler`` is the training sampler: like ``DistributedSampler`` it shuffles with ``seed + epoch``
and gives each rank an equal share, but it can also start part-way into an epoch (exact ``--resume``) and
yields ``(index, sample_seed)`` pairs, so that data augmentation is seeded per sample and does not depend on
the number of ranks or DataLoader workers (see :class:`SeededDataset`).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from qdetr_deploy.errors import QDetrError


@dataclass
class DistEnv:
    """Where this process sits: ``rank`` of ``world_size``, its device and the backend (None: single)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    created: bool = False  # this call started the process group (and cleanup(env) ends it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise QDetrError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str | None = None) -> DistEnv:
    """Join the torchrun process group (if launched by torchrun) and pick this process's device.

    ``device``: "cpu", "cuda" or None (CUDA when available). With CUDA each process takes GPU ``LOCAL_RANK``
    and the backend is NCCL; on CPUs it is gloo. Calling it again returns the existing set-up.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise QDetrError("device 'cuda' requested but CUDA is not available")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if world <= 1:
        return DistEnv(0, 1, 0, dev, None)
    if not dist.is_available():
        raise QDetrError("launched with WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if use_cuda else "gloo"
    created = not dist.is_initialized()
    if created:
        kwargs: dict[str, Any] = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, dist.get_backend(), created)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (any picklable Python object), in rank order; ``[obj]`` when single."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ranks (a copy; the input is left alone)."""
    values = values.detach().clone()
    if is_dist():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def cleanup(env: DistEnv | None = None) -> None:
    """Leave the process group: the one ``env`` started (no-op when it joined an existing one), or any."""
    if is_dist() and (env is None or env.created):
        dist.destroy_process_group()


def distributed_sampler(dataset: Dataset, shuffle: bool = False, seed: int = 0) -> Sampler:
    """Evaluation sampler: each rank a contiguous share, padded with repeats to equal length
    (``DistributedSampler``; gathered results must be de-duplicated by image id). Single process:
    the dataset in order (or shuffled)."""
    if is_dist():
        return DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=False)
    if shuffle:
        return torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.SequentialSampler(dataset)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch (stable across ranks, workers and resumes)."""
    return ((seed * 1_000_003 + epoch) * 1_000_033 + index) % (2**63 - 1)


class ShardedEpochSampler(Sampler):
    """Training sampler yielding ``(index, sample_seed)``: a ``seed + epoch`` permutation, sharded over ranks.

    ``set_epoch(epoch, start)`` selects the epoch and skips its first ``start`` samples (global count over
    all ranks, a multiple of ``world_size * batch_size`` when resuming). The rest is padded with repeats to
    a multiple of ``world_size`` and rank ``r`` takes positions ``r, r + world, ...``, as
    ``DistributedSampler`` does.
    """

    def __init__(self, num_samples: int, shuffle: bool = True, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None) -> None:
        if num_samples < 1:
            raise QDetrError("the training set is empty")
        self.num_samples, self.shuffle, self.seed = num_samples, shuffle, seed
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, max(0, min(start, self.num_samples))

    def order(self) -> list[int]:
        """The full (unsharded) order of the current epoch."""
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def _indices(self) -> list[int]:
        rest = self.order()[self.start:]
        if not rest:
            return []
        pad = (-len(rest)) % self.world_size
        rest += (rest * (pad // len(rest) + 1))[:pad]
        return rest[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self._indices():
            yield i, sample_seed(self.seed, self.epoch, i)

    def __len__(self) -> int:
        rest = self.num_samples - self.start
        return -(-rest // self.world_size) if rest > 0 else 0


class SeededDataset(Dataset):
    """Wraps a dataset so that item ``(index, seed)`` is drawn with Python's ``random`` and torch's global
    generator seeded by ``seed`` (the callers' generator states are restored afterwards); a plain integer
    index reads the item unseeded."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        py_state, torch_state = random.getstate(), torch.get_rng_state()
        try:
            random.seed(seed)
            torch.manual_seed(seed)
            return self.dataset[index]
        finally:
            random.setstate(py_state)
            torch.set_rng_state(torch_state)


# -- wrapping the model ----------------------------------------------------------------------------------
def probe_unused(model: nn.Module, objective: Callable, loader: DataLoader, device: torch.device) -> bool:
    """One forward/backward before DDP wrapping: True when some trainable parameter gets no gradient."""
    buffers = {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()}
    images, mask, targets = next(iter(loader))
    loss, _ = objective(model, images.to(device), mask.to(device), to_device(targets, device))
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    model.load_state_dict(buffers)
    return any(all_gather_object(bool(unused)))


def wrap_ddp(model: nn.Module, objective: Callable, loader: DataLoader, config: Any, env: DistEnv
             ) -> nn.Module:
    """``model`` in DistributedDataParallel when several processes run (``config.find_unused_parameters``:
    None probes with :func:`probe_unused`)."""
    if not env.distributed:
        return model
    find_unused = config.find_unused_parameters
    if find_unused is None:
        find_unused = probe_unused(model, objective, loader, env.device)
    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def to_device(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
