"""Wire messages: bounds, unknown fields, errors that name the field."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from protocol import messages as m
from tests.servers import tiny_run_config


def test_run_config_round_trips_and_checks_stage_count():
    cfg = m.RunConfig(**tiny_run_config())
    assert m.RunConfig.model_validate_json(cfg.model_dump_json()) == cfg
    assert cfg.total_steps == 4
    bad = tiny_run_config()
    bad["model"] = {"n_stages": 3}
    with pytest.raises(ValidationError, match="n_stages"):
        m.RunConfig(**bad)


@pytest.mark.parametrize("field,value", [("run_id", "Bad Id!"), ("micro_batches_per_step", 0),
                                         ("merge_method", "median"), ("lease_seconds", -1)])
def test_run_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValidationError) as e:
        m.RunConfig(**tiny_run_config(**{field: value}))
    assert field in str(e.value)


def test_unknown_fields_and_bad_sha_rejected():
    with pytest.raises(ValidationError, match="extra"):
        m.LeaseRequest(max_hops=1, fwd_out_bytes=1, bwd_out_bytes=1, sneaky=1)
    with pytest.raises(ValidationError, match="sha256"):
        m.HopDone(hop_id="h1", sha256="XYZ", size=1)
    with pytest.raises(ValidationError, match="max_hops"):
        m.LeaseRequest(max_hops=1000, fwd_out_bytes=1, bwd_out_bytes=1)
    with pytest.raises(ValidationError, match="loss"):
        m.HopDone(hop_id="h1", loss=float("inf"))
    with pytest.raises(ValidationError, match="reason"):
        m.HopFail(hop_id="h1", reason="because")


def test_lease_response_with_hop_round_trips():
    out = m.OutputRef(key="runs/x/r0/s0/act/h1", put_url="http://x/y", size=10, expires_at=5.0)
    hop = m.Hop(hop_id="h1", sample_id=3, round=0, stage=0, kind="fwd", inner_step=0, attempt=1,
                output=out, deadline=5.0)
    resp = m.LeaseResponse(action="work", hops=[hop], round=0, inner_step=0, stage=0)
    assert m.LeaseResponse.model_validate_json(resp.model_dump_json()) == resp


def test_lease_long_poll_is_optional_and_bounded():
    assert m.LeaseRequest(fwd_out_bytes=1, bwd_out_bytes=1).wait_ms == 0
    assert m.LeaseRequest(fwd_out_bytes=1, bwd_out_bytes=1, wait_ms=30_000).wait_ms == 30_000
    with pytest.raises(ValidationError, match="wait_ms"):
        m.LeaseRequest(fwd_out_bytes=1, bwd_out_bytes=1, wait_ms=30_001)
