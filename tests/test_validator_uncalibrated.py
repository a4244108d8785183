"""Calibrated or not trusted, end to end: miners that declare a GPU the run has no calibration for
(replayed here on a CPU validator in float32) are never penalised for honest numerical drift, while
a cheater declaring the same GPU is still caught by the gross bounds; the validator reports the
uncalibrated combination, and the owner's dashboard shows it."""
from __future__ import annotations

import httpx
import pytest
import torch

from neurons.transfer import ObjectTransfer
from neurons.validator_loop import Validator, ValidatorSettings
from protocol.messages import RegisterRequest
from protocol.routes import route
from tests.harness.validator_subnet import RATE_LIMIT, run_subnet, workers

ROUNDS = 2
GPU = "NVIDIA Test GPU"
# registration alternates stages 0, 1, 0; the two "gpu" miners compute in bf16 on this CPU but say
# they run CUDA bf16 on a GPU model no run config entry covers
MINERS = [("gpu-honest", "honest", torch.bfloat16, 0), ("cpu-honest", "honest", torch.float32, 1),
          ("gpu-random", "random", torch.bfloat16, 0)]


def _declare_gpu(name: str, miner) -> None:
    if name.startswith("gpu"):
        miner._registration = lambda: RegisterRequest(device_class="cuda", compute_dtype="bfloat16",
                                                      device_name=GPU)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    # speed routing off: on a CPU the bf16 "gpu" miner is slower than its stage-0 peer (the random
    # cheater) and could be routed no sample in a round; this test is about audits, not routing
    with run_subnet(tmp_path_factory.mktemp("uncal"), MINERS, prepare=_declare_gpu, total_rounds=ROUNDS,
                    samples_per_round=8, bridge_flags=("--slow-factor", "0")) as net:
        chain, client, vkey = net["chain"], net["client"], net["keys"]["validators"][0]
        v = Validator(client, ObjectTransfer(), chain, vkey,
                      ValidatorSettings(state_path=str(net["tmp"] / "v.json")))
        chain.advance_blocks(RATE_LIMIT)
        v.tick()
        dash = httpx.get(net["bridge"].url + route("dashboard").path, timeout=10).json()
        worked = [workers(client.hoplog(r)) for r in range(ROUNDS)]
        yield dict(net, v=v, dash=dash, weights=chain.weights_of(vkey.ss58_address), worked=worked)


def test_honest_drift_on_an_uncalibrated_gpu_is_never_penalised(result):
    v, names, uid, w = result["v"], result["names"], result["uid"], result["weights"]
    by_miner = {hk: [x for x in v.audits.verdicts if x[1] == hk] for hk in names.values()}
    assert by_miner[names["gpu-honest"]] == []  # audited every round it worked, no verdict either way
    rounds_worked = [r for r in range(ROUNDS) if names["gpu-honest"] in result["worked"][r]]
    assert rounds_worked and v.audits.withheld == len(rounds_worked), (rounds_worked, v.audits)
    assert all(ok for _, _, ok, _ in by_miner[names["cpu-honest"]]) and by_miner[names["cpu-honest"]]
    assert w[uid["gpu-honest"]] > 0 and w[uid["cpu-honest"]] > 0
    assert any(GPU in c and "cuda/bfloat16" in c and "cpu/float32" in c for c in v.audits.uncalibrated)


def test_a_cheater_on_the_same_uncalibrated_gpu_is_still_caught(result):
    v, names, uid, w = result["v"], result["names"], result["uid"], result["weights"]
    fails = [x for x in v.audits.verdicts if x[1] == names["gpu-random"] and not x[2]]
    assert fails and all("gross bounds" in reason for *_, reason in fails)
    assert w.get(uid["gpu-random"], 0.0) == 0.0


def test_the_dashboard_names_the_uncalibrated_combination(result):
    alerts = result["dash"]["alerts"]
    assert any("without a calibrated tolerance" in a and GPU in a for a in alerts), (alerts, result["dash"]["verdicts"][:3])
