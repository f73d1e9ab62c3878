"""The training and validation loaders of both trainers, and where a run's random draws come from.

Each loader is built once per run; its worker processes persist from epoch to epoch, as in timm's ``train.py``.

Randomness, so that a run resumed at any epoch boundary continues exactly as the uninterrupted run would have:

* The order of an epoch is drawn from (seed, epoch) by a ``DistributedSampler`` (one process: a world of one).
* Each sample's augmentation (timm's transforms draw from torch's, ``random``'s and numpy's global RNGs) comes from
  RNGs seeded by (seed, epoch, index): :class:`SeededSamples`. It does not depend on which worker or process reads
  the sample, so ``--workers`` may change on a resume.
* The training step's own draws (stochastic depth, dropout, mixup) come from the main process's global RNGs, seeded
  by (seed, epoch, rank) at the start of each epoch: :func:`start_epoch`.
* The loaders draw nothing from the global RNGs (each has a generator of its own).

Like timm's ``train.py``, an epoch leaves out the last incomplete batch (of each process's share) when there is a
full one: a last batch of a few images would take a full step of the learning rate on a noisy gradient, and a batch
of one cannot be normalised by BatchNorm in training.
"""
import contextlib
import random
from typing import Any, Callable, Iterator, Optional, Sized, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset, get_worker_info

from .distributed import Processes

__all__ = ['EpochSampler', 'SeededSamples', 'global_rngs_kept', 'seed_epoch', 'start_epoch', 'training_loader',
           'validation_loader']

_STEP_DRAWS, _SAMPLE_DRAWS = 0, 1  # keep the seeds of the two kinds of draws apart (rank r and sample index r)


def _mix(*values: int) -> int:
    """One 32-bit seed from several integers."""
    seed = 0
    for value in values:
        seed = (seed * 1_000_003 + value) % 2 ** 32
    return seed


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed the main process's global RNGs (torch's CPU generator, ``random``, numpy) for ``epoch`` of process
    ``rank``: the training step's draws (stochastic depth, dropout, mixup) follow from (seed, epoch, rank)."""
    value = _mix(_STEP_DRAWS, seed, epoch, rank)
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value)


def _seed_global_rngs(value: int) -> None:
    torch.random.default_generator.manual_seed(value)  # the CPU generator only: transforms run on the CPU
    random.seed(value)
    np.random.seed(value)


@contextlib.contextmanager
def global_rngs_kept(cuda: bool = True) -> Iterator[None]:
    """The caller's global RNG states (torch's CPU one, CUDA's too with ``cuda``, ``random``'s and numpy's),
    restored on exit."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=None if cuda else []):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def start_epoch(loader: DataLoader, seed: int, epoch: int, rank: int) -> DataLoader:
    """``loader`` (from :func:`training_loader`) set to ``epoch``, with the main process's RNGs seeded for it
    (:func:`seed_epoch`)."""
    seed_epoch(seed, epoch, rank)
    loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
    return loader


class SeededSamples(Dataset):
    """``dataset`` read with (seed, index) keys: the sample at ``index`` is produced with the global RNGs seeded by
    ``seed``, so its random augmentation depends on the key only."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Tuple[int, int]) -> Any:
        seed, index = key
        # read in the main process (no workers), its own draws stay its own; a worker's RNGs serve its samples only
        kept = global_rngs_kept(cuda=False) if get_worker_info() is None else contextlib.nullcontext()
        with kept:
            _seed_global_rngs(seed)
            return self.dataset[index]


class EpochSampler(Sampler[Tuple[int, int]]):
    """This process's share of a data set's indices for the epoch set by :meth:`set_epoch`, shuffled by (seed,
    epoch) and padded so that every process gets as many, each paired with its sample's seed (seed, epoch, index)
    for :class:`SeededSamples`."""

    def __init__(self, data: Sized, seed: int, processes: Processes) -> None:
        self.order = DistributedSampler(data, processes.world_size, processes.rank, shuffle=True, seed=seed)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.order.set_epoch(epoch)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        return ((_mix(_SAMPLE_DRAWS, self.seed, self.epoch, index), index) for index in self.order)

    def __len__(self) -> int:
        return len(self.order)


def _loader(dataset: Dataset, batch_size: int, workers: int, processes: Processes,
            collate_fn: Optional[Callable] = None, **kwargs: Any) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0,
                      collate_fn=collate_fn, pin_memory=processes.device.type == 'cuda',
                      generator=torch.Generator(), **kwargs)


def training_loader(dataset: Dataset, batch_size: int, workers: int, processes: Processes, seed: int,
                    collate_fn: Optional[Callable] = None) -> DataLoader:
    """This process's training batches of ``dataset``; call ``loader.sampler.set_epoch(epoch)`` before each epoch.
    ``len(loader)`` is the number of batches of every epoch."""
    sampler = EpochSampler(dataset, seed, processes)  # type: ignore[arg-type]
    full_batch = len(sampler) >= batch_size
    return _loader(SeededSamples(dataset), batch_size, workers, processes, collate_fn, sampler=sampler,
                   drop_last=full_batch)


def validation_loader(dataset: Dataset, batch_size: int, workers: int, processes: Processes,
                      collate_fn: Optional[Callable] = None) -> DataLoader:
    """This process's share of ``dataset`` in order, each image in exactly one process's share."""
    shard = Subset(dataset, range(processes.rank, len(dataset), processes.world_size))  # type: ignore[arg-type]
    return _loader(shard, batch_size, workers, processes, collate_fn)
