"""Evaluate many candidate subnetworks at once: worker processes on this machine, ranks of a
torch.distributed job (launched by torchrun) across machines, or both.

No scheduler of our own: samples are split statically (sample i goes to rank i mod world_size, and
within a rank to a concurrent.futures process pool), results are gathered with
torch.distributed.all_gather_object. Every evaluation gets its own seed derived from the sample, so
the result does not depend on which process ran it: one process, a pool, or torchrun with any number
of ranks give the same errors (given the same torch thread count per evaluation)."""
from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

log = logging.getLogger("fxprune")

Evaluator = Callable[[torch.nn.Module, int], float]  # (subnetwork, seed) -> error (lower is better)


def distributed_rank_and_size() -> tuple:
    """(rank, world_size) of the torch.distributed job, initialising it from torchrun's environment
    when that is set and nothing has initialised it yet; (0, 1) outside a job."""
    import torch.distributed as dist
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1
        # gloo works everywhere (CPU tensors); NCCL would need each rank to own a GPU, and only
        # Python objects travel here
        dist.init_process_group(backend="gloo")
    return dist.get_rank(), dist.get_world_size()


def evaluate_samples(build: Callable[[int], torch.nn.Module], seeds: Sequence[int], evaluator: Evaluator, *,
                     workers: int = 1, threads_per_worker: Optional[int] = None, label: str = "samples",
                     on_result: Optional[Callable[[int, float, float], None]] = None) -> List[float]:
    """Errors of the subnetworks build(0), ..., build(n-1), evaluated as evaluator(model, seeds[i]).

    workers: processes on this machine (1: in this process). In a torch.distributed job every rank
    evaluates its share and all ranks return the full list. on_result(i, error, seconds) is called in
    the rank that evaluated sample i, as results arrive."""
    n = len(seeds)
    rank, world = distributed_rank_and_size()
    mine = list(range(rank, n, world))
    started = time.perf_counter()
    errors: Dict[int, float] = {}

    def record(i: int, error: float, seconds: float) -> None:
        errors[i] = float(error)
        done = len(errors)
        eta = (time.perf_counter() - started) / done * (len(mine) - done)
        log.info("%s: %d/%d evaluated%s, sample %d error %.4f (%.1fs), ETA %.0fs", label, done, len(mine),
                 f" on rank {rank}/{world}" if world > 1 else "", i, error, seconds, eta)
        if on_result is not None:
            on_result(i, error, seconds)

    if workers <= 1 or len(mine) <= 1:
        for i in mine:
            clock = time.perf_counter()
            record(i, _checked(evaluator(build(i), seeds[i]), i), time.perf_counter() - clock)
    else:
        threads = threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
        context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context,
                                                    initializer=_worker_init, initargs=(evaluator, threads)) as pool:
            futures = {pool.submit(_worker_evaluate, build(i), seeds[i]): i for i in mine}
            for future in concurrent.futures.as_completed(futures):
                error, seconds = future.result()
                record(futures[future], _checked(error, futures[future]), seconds)
    if world > 1:
        import torch.distributed as dist
        gathered: List[Optional[Dict[int, float]]] = [None] * world
        dist.all_gather_object(gathered, errors)
        for part in gathered:
            errors.update(part)
    return [errors[i] for i in range(n)]


def _checked(error, index: int) -> float:
    value = float(error)
    if value != value:  # NaN: a diverged proxy fine-tune; rank it last rather than poison the statistics
        log.warning("sample %d: the evaluator returned NaN; counted as error 1.0", index)
        return 1.0
    return value


_WORKER_EVALUATOR: Optional[Evaluator] = None


def _worker_init(evaluator: Evaluator, threads: int) -> None:
    global _WORKER_EVALUATOR
    _WORKER_EVALUATOR = evaluator
    torch.set_num_threads(threads)
    logging.getLogger("fxprune").setLevel(logging.WARNING)  # the parent reports progress


def _worker_evaluate(model: torch.nn.Module, seed: int) -> tuple:
    clock = time.perf_counter()
    error = _WORKER_EVALUATOR(model, seed)
    return float(error), time.perf_counter() - clock
