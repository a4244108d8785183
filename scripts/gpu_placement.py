"""Where each process of a local subnet runs on a host with several GPUs (pure; no GPU needed).

The bridge gives a registering miner the stage with the fewest replicas, lowest index first, so
when miners register one at a time the j-th to register serves stage j mod S as replica j // S.
The j-th of M miners goes to GPU j * G // M: with one replica per stage each GPU holds a contiguous
group of stages (the pipeline's hand-offs inside a group stay on one GPU); with R replicas and
G = R GPUs each GPU holds one whole pipeline, so every GPU carries the same compute and the same
activation memory (stage 0 holds the most forward graphs, and no GPU gets two of them unless
R > G). The validator goes on the last GPU, whose stages hold the fewest graphs.

Every child gets NCCL_NVLS_ENABLE=0: multi-GPU hosts here run NCCL with NVLink multicast off.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["NCCL_ENV", "PlacementError", "Slot", "plan", "validator_gpu", "child_env", "check_visible"]

NCCL_ENV = {"NCCL_NVLS_ENABLE": "0"}


class PlacementError(ValueError):
    """A --gpus setting that cannot place the subnet (the message says what to change)."""


@dataclass(frozen=True)
class Slot:
    """One miner's place: its registration order, the stage and replica the bridge gives it, its GPU."""

    order: int
    stage: int
    replica: int
    gpu: int | None  # None: no pinning (every process sees the default GPU)


def plan(n_stages: int, miners: int, gpus: int) -> list[Slot]:
    """Each of `miners` miners, in registration order, with its stage, replica and GPU (`gpus` 0: none)."""
    if n_stages < 1 or miners < 1:
        raise PlacementError(f"need at least one stage and one miner, got {n_stages} stage(s) and {miners} miner(s)")
    if gpus < 0:
        raise PlacementError(f"--gpus {gpus}: give 0 (every process on the default GPU) or a positive count")
    if gpus > miners:
        raise PlacementError(f"--gpus {gpus} is more than the {miners} miners: every GPU needs a miner; "
                             "lower --gpus or raise --miners-per-stage")
    return [Slot(j, j % n_stages, j // n_stages, j * gpus // miners if gpus else None) for j in range(miners)]


def validator_gpu(gpus: int) -> int | None:
    """The validator's GPU: the last one (None when nothing is pinned)."""
    return gpus - 1 if gpus > 0 else None


def child_env(gpu: int | None) -> dict[str, str]:
    """Environment additions for one child process on `gpu` (None: the default GPU)."""
    env = dict(NCCL_ENV)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def check_visible(gpus: int, visible: int) -> None:
    """PlacementError when more GPUs are asked for than the host shows."""
    if gpus > visible:
        raise PlacementError(f"--gpus {gpus} but this host shows {visible} GPU(s) (nvidia-smi -L; "
                             "CUDA_VISIBLE_DEVICES); lower --gpus")
