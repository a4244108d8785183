"""Memory is bounded and out-of-memory is not failure, for real miners on a real subnet: one miner
holds no forward graph (a 1-byte activation budget: every backward recomputes), the other runs on a
"device" too small for a whole sample (a fault fixture raises torch.OutOfMemoryError, as the CUDA
allocator does, for more than one sequence at a time). With one attempt per hop, any hop that
failed would abandon its sample: none does, and the round trains."""
from __future__ import annotations

import pytest
import torch

from neurons.miner_loop import Miner
from tests.harness.miner_subnet import MinerThread, run_config, set_threads, start_subnet


class SmallDeviceMiner(Miner):
    """A miner whose device fits one sequence of a sample at a time."""

    def register(self):
        a = super().register()
        self.ooms = 0
        self.worker.module.register_forward_pre_hook(self._allocate)
        return a

    def _allocate(self, module, args):
        if args[0].shape[0] > 1:
            self.ooms += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB (injected)")


@pytest.mark.timeout(200)
def test_miners_over_their_memory_train_every_sample_without_a_failed_hop(tmp_path):
    set_threads()
    cfg = run_config(run_id="memory", samples_per_round=4, total_rounds=1, max_attempts=1, batch_size=2)
    net = start_subnet(tmp_path, cfg, miners=2)
    try:
        m0 = MinerThread(net, net.keys["miners"][0],
                         make=lambda *a, **kw: Miner(*a, max_memory=1, **kw))
        m1 = MinerThread(net, net.keys["miners"][1], make=SmallDeviceMiner)
        assert (m0.assignment.stage, m1.assignment.stage) == (0, 1)
        m0.start(), m1.start()
        m0.join(150), m1.join(150)
        metrics = net.metrics()
    finally:
        net.stop()
    assert metrics["phase"] == "done" and metrics["empty_rounds"] == 0
    assert metrics["completed_total"] == 4 and metrics["abandoned_total"] == 0, metrics["abandon_reasons"]
    stats0, stats1 = m0.miner.worker.memory_stats, m1.miner.worker.memory_stats
    assert stats0["recomputed_forwards"] + stats0["dropped_graphs"] == 4 and m0.miner.worker._held == 0
    assert m1.miner.ooms > 0 and stats1["oom_retries"] == m1.miner.ooms
    assert all(m["failures"] == 0 for m in metrics["miners"])
