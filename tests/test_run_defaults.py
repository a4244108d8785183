"""One set of sync defaults everywhere: RunConfig's defaults are what run.example.yaml writes, what
the localnet starts its bridge with and what bench_gpu_subnet measures unless told otherwise."""
from __future__ import annotations

import yaml

from protocol.run_config import RunConfig
from tests.servers import REPO

SYNC_FIELDS = ("sync_mode", "sync_codec", "sync_merged_codec", "sync_block", "sync_shards", "sync_mergers",
               "checkpoint_every")


def _defaults() -> dict:
    return {f: RunConfig.model_fields[f].default for f in SYNC_FIELDS}


def test_the_defaults_are_the_sharded_int4_int8_sync():
    d = _defaults()
    assert (d["sync_mode"], d["sync_codec"], d["sync_merged_codec"], d["sync_shards"]) == ("sharded", "int4", "int8", 4)
    assert d["checkpoint_every"] > 1  # a full state (8 bytes a parameter) not every round


def test_run_example_yaml_writes_the_run_configs_defaults():
    example = yaml.safe_load((REPO / "run.example.yaml").read_text())
    assert {f: example[f] for f in SYNC_FIELDS} == _defaults()


def test_the_localnet_and_the_gpu_benchmark_run_the_defaults_unless_told():
    from scripts.bench_gpu_subnet import _model, _run_config, build_parser as bench_parser
    from scripts.localnet import build_parser as localnet_parser, run_config_from_args
    local = run_config_from_args(localnet_parser().parse_args([]))
    assert {f: local.get(f, _defaults()[f]) for f in SYNC_FIELDS} == _defaults()
    args = bench_parser().parse_args(["--preset", "tiny", "--device", "cpu"])
    run = RunConfig(**_run_config(args, _model(args)))
    assert {f: getattr(run, f) for f in SYNC_FIELDS} == _defaults()
    told = bench_parser().parse_args(["--preset", "tiny", "--sync", "state", "--sync-codec", "fp32"])
    run = RunConfig(**_run_config(told, _model(told)))
    assert (run.sync_mode, run.sync_codec) == ("state", "fp32")
