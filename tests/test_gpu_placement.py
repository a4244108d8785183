"""Where bench_gpu_subnet --gpus N puts each process (scripts/gpu_placement.py), checked without a
GPU: stage groups per GPU, one pipeline per GPU for replicas, CUDA_VISIBLE_DEVICES and
NCCL_NVLS_ENABLE=0 in every child's real environment, and one-line errors for impossible counts."""
from __future__ import annotations

import json
import sys
from collections import Counter

import pytest

from scripts.gpu_placement import PlacementError, check_visible, child_env, plan, validator_gpu


def _gpus(slots):
    return [s.gpu for s in slots]


def test_one_replica_per_stage_puts_contiguous_stage_groups_on_each_gpu():
    assert _gpus(plan(4, 4, 2)) == [0, 0, 1, 1]
    assert _gpus(plan(4, 4, 4)) == [0, 1, 2, 3]
    assert _gpus(plan(3, 3, 1)) == [0, 0, 0]
    assert _gpus(plan(4, 4, 0)) == [None] * 4  # nothing pinned: the default GPU
    assert [(s.stage, s.replica) for s in plan(4, 4, 2)] == [(0, 0), (1, 0), (2, 0), (3, 0)]


def test_replicas_as_many_as_gpus_give_each_gpu_one_whole_pipeline():
    slots = plan(4, 8, 2)  # --miners-per-stage 2 --gpus 2
    assert [(s.stage, s.replica, s.gpu) for s in slots[:4]] == [(st, 0, 0) for st in range(4)]
    assert [(s.stage, s.replica, s.gpu) for s in slots[4:]] == [(st, 1, 1) for st in range(4)]
    for gpu in (0, 1):  # every stage once per GPU: the same compute and the same activation memory
        assert sorted(s.stage for s in slots if s.gpu == gpu) == [0, 1, 2, 3]
    # 2 replicas on 4 GPUs: each pipeline over two GPUs, stage 0 of each on its own GPU
    assert _gpus(plan(4, 8, 4)) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert {s.gpu for s in plan(4, 8, 4) if s.stage == 0} == {0, 2}


@pytest.mark.parametrize("stages", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_every_gpu_gets_miners_balanced_and_each_stage_spread_over_gpus(stages, replicas):
    miners = stages * replicas
    for gpus in range(1, miners + 1):
        slots = plan(stages, miners, gpus)
        counts = Counter(s.gpu for s in slots)
        assert sorted(counts) == list(range(gpus)), (gpus, counts)  # no GPU idle, none outside 0..G-1
        assert max(counts.values()) - min(counts.values()) <= 1, (gpus, counts)
        assert _gpus(slots) == sorted(_gpus(slots))  # registration order walks the GPUs in order
        assert all(s.stage == s.order % stages and s.replica == s.order // stages for s in slots)
        per_stage = Counter((s.stage, s.gpu) for s in slots)  # a stage's replicas never pile onto one GPU
        limit = 1 if gpus >= replicas else -(-replicas // gpus)  # ceil(R / G) when GPUs are fewer
        assert max(per_stage.values()) <= limit, (gpus, per_stage)


def test_impossible_gpu_counts_are_one_line_errors():
    with pytest.raises(PlacementError, match="more than the 4 miners"):
        plan(4, 4, 5)
    with pytest.raises(PlacementError, match="--gpus -1"):
        plan(4, 4, -1)
    with pytest.raises(PlacementError, match="at least one stage"):
        plan(0, 4, 1)
    with pytest.raises(PlacementError, match="shows 1 GPU"):
        check_visible(2, 1)
    check_visible(2, 8)
    assert validator_gpu(4) == 3 and validator_gpu(0) is None


def test_children_run_with_their_gpu_and_nvlink_multicast_off(tmp_path, monkeypatch):
    """A real child started the way the cluster starts every neuron: its environment has its GPU and
    NCCL_NVLS_ENABLE=0 even when the launcher's own environment says otherwise."""
    from scripts.localnet_cluster import Neuron
    assert child_env(None) == {"NCCL_NVLS_ENABLE": "0"}
    assert child_env(2) == {"NCCL_NVLS_ENABLE": "0", "CUDA_VISIBLE_DEVICES": "2"}
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    show = "import json, os; print(json.dumps({k: os.environ.get(k) for k in ('NCCL_NVLS_ENABLE', 'CUDA_VISIBLE_DEVICES')}))"
    seen = {}
    for name, gpu in (("pinned", 2), ("unpinned", None)):
        n = Neuron(name, [sys.executable, "-c", show], tmp_path / f"{name}.log", env=child_env(gpu))
        n.start()
        assert n.proc.wait(timeout=60) == 0
        seen[name] = json.loads((tmp_path / f"{name}.log").read_text().strip().splitlines()[-1])
    assert seen["pinned"] == {"NCCL_NVLS_ENABLE": "0", "CUDA_VISIBLE_DEVICES": "2"}
    assert seen["unpinned"] == {"NCCL_NVLS_ENABLE": "0", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}


def test_the_benchmark_refuses_an_impossible_gpu_count_before_running_anything(capsys):
    from scripts.bench_gpu_subnet import main
    with pytest.raises(SystemExit) as e:
        main(["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--gpus", "9"])
    assert str(e.value).startswith("bench_gpu_subnet: --gpus 9 is more than the") and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        main(["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--gpus", "1"])
    assert "shows 0 GPU(s)" in str(e.value)
    assert "[reference]" not in capsys.readouterr().out  # refused before the reference trainer ran
