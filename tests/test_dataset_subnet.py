"""End-to-end on a named dataset: prepare_dataset.py builds it and uploads it to the local rclone S3,
the bridge checks it against the run config and serves it, miners train on it, and the validator,
with its own cache, fetches the same shards and replays them: identical tokens, the audits pass.
A shard tampered with in the bucket then gives a clear error, never different tokens, and the
validator counts that audit as incomplete rather than failing the miner.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
import yaml

from neurons.dataset_http import HttpSource
from neurons.transfer import ObjectTransfer
from neurons.validator_loop import Validator, ValidatorSettings
from spec.dataset import DatasetRef
from resbm import data
from resbm.config import ModelConfig
from resbm.dataset import forget_dataset
from scripts import prepare_dataset
from tests.servers import ACCESS_KEY, REPO, SECRET_KEY, make_chain, start_s3
from tests.harness.validator_subnet import RATE_LIMIT, run_config, run_subnet

pytestmark = pytest.mark.timeout(400)

VOCAB = 384
MINERS = [("honest0", "honest", torch.float32, 0), ("honest1", "honest", torch.float32, 1)]


def write_corpus(root, docs: int = 60, tokens_per_doc: int = 1500) -> None:
    """Text documents (decoded from the shipped validation split) as JSONL plus two .txt files."""
    val = data.load().tokens("val")
    root.mkdir(parents=True)
    texts = [data.decode_tokens(val[i * tokens_per_doc:(i + 1) * tokens_per_doc]) for i in range(docs)]
    (root / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:-2]))
    (root / "b.txt").write_text(texts[-2])
    (root / "c.txt").write_text(texts[-1])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The dataset built twice (identical bytes), uploaded to a fresh S3 server."""
    tmp = tmp_path_factory.mktemp("dataset")
    write_corpus(tmp / "corpus")
    s3 = start_s3(tmp / "s3")
    s3.storage()  # creates the bucket
    env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    try:
        args = [str(tmp / "corpus"), "--name", "e2e-tiny", "--vocab-size", str(VOCAB), "--shard-tokens", "6000",
                "--val-fraction", "0.1"]
        assert prepare_dataset.main(args + ["--out", str(tmp / "again")]) == 0
        assert prepare_dataset.main(args + ["--out", str(tmp / "out"), "--upload", f"s3://{s3.bucket}/datasets/e2e",
                                            "--s3-endpoint", s3.endpoint]) == 0
    finally:
        mp.undo()
    raw = (tmp / "out" / "manifest.json").read_bytes()
    assert raw == (tmp / "again" / "manifest.json").read_bytes()  # deterministic: same shards, same hashes
    ref = DatasetRef(manifest="datasets/e2e/manifest.json", sha256=hashlib.sha256(raw).hexdigest())
    yield dict(tmp=tmp, s3=s3, ref=ref, out=tmp / "out")
    s3.stop()


def _run_over(ref: DatasetRef, vocab: int = VOCAB) -> dict:
    model = ModelConfig.from_dict(run_config()["model"]).to_dict() | {"vocab_size": vocab}
    return dict(run_id="data-e2e", model=model, dataset=ref.model_dump())


def test_miners_and_validator_read_identical_tokens_and_a_tampered_shard_is_refused(dataset, tmp_path,
                                                                                 monkeypatch):
    ref, s3 = dataset["ref"], dataset["s3"]
    monkeypatch.setenv("RESBM_DATA_CACHE", str(tmp_path / "miner-cache"))
    forget_dataset(ref.sha256)
    (tmp_path / "net").mkdir()
    with run_subnet(tmp_path / "net", MINERS, s3=s3, **_run_over(ref)) as net:
        run = data.open_run_dataset(ref)  # the miners' Dataset, opened through the bridge at register
        assert run.vocab_size == VOCAB and len(run.manifest.split_shards("train")) >= 3
        miner_cache = sorted(p.name for p in (tmp_path / "miner-cache").glob("*.bin"))
        assert miner_cache and all(p.split(".")[0] in {s.sha256 for s in run.manifest.shards} for p in miner_cache)

        # the validator: its own cache, the dataset fetched again through the bridge
        monkeypatch.setenv("RESBM_DATA_CACHE", str(tmp_path / "validator-cache"))
        forget_dataset(ref.sha256)
        settings = ValidatorSettings(state_path=str(tmp_path / "v.json"), audit_max_seconds=60.0)
        net["chain"].advance_blocks(RATE_LIMIT)
        v = Validator(net["client"], ObjectTransfer(), net["chain"], net["keys"]["validators"][0], settings)
        v.tick(max_rounds=2)
        assert v.audits.runs >= 2 and v.audits.incomplete == 0, v.audits
        assert v.audits.failed == 0 and all(p for _, _, p, _ in v.audits.verdicts), v.audits.verdicts
        mine = data.open_run_dataset(ref)
        assert mine is not run and list((tmp_path / "validator-cache").glob("*.bin"))
        hoplog = net["client"].hoplog(0)
        run_cfg = v.run
        for sid in sorted({r.sample_id for r in hoplog.records}):
            a = run.batch(run_cfg.data_seed, sid, run_cfg.batch_size, 16)
            b = mine.batch(run_cfg.data_seed, sid, run_cfg.batch_size, 16)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

        # tamper with a shard that round 0 read; a fresh cache must refuse it, clearly
        sid = hoplog.records[0].sample_id
        victim = mine.manifest.file(mine.shards_for(run_cfg.data_seed, sid, run_cfg.batch_size, 16)[0])
        blob = bytearray((dataset["out"] / victim.name).read_bytes())
        blob[-2] ^= 0x01
        s3.storage().put(f"datasets/e2e/{victim.name}", bytes(blob))
        monkeypatch.setenv("RESBM_DATA_CACHE", str(tmp_path / "fresh-cache"))
        forget_dataset(ref.sha256)
        data.open_run_dataset(ref, net["client"].dataset_url, HttpSource)  # the manifest is intact: opening works
        with pytest.raises(data.DataError, match=f"{victim.name}.*corrupt or tampered"):
            data.batch(run_cfg.data_seed, sid, run_cfg.batch_size, 16, dataset=ref)
        assert not list((tmp_path / "fresh-cache").glob(f"{victim.sha256}*"))  # nothing bad was kept

        # a validator that cannot read the data does not fail the miners: the audit is incomplete
        v2 = Validator(net["client"], ObjectTransfer(), net["chain"], net["keys"]["validators"][0],
                       ValidatorSettings(state_path=str(tmp_path / "v2.json")))
        v2.tick(max_rounds=2)
        assert v2.audits.failed == 0 and v2.audits.incomplete >= 1, v2.audits
    forget_dataset(ref.sha256)


def test_bridge_refuses_a_run_config_whose_vocab_disagrees(dataset, tmp_path):
    cfg = run_config() | _run_over(dataset["ref"], vocab=VOCAB + 1)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    s3 = dataset["s3"]
    make_chain(tmp_path / "chain.db", miners=0, validators=0)  # a chain, so the dataset check is what fails
    proc = subprocess.run([sys.executable, "-m", "bridge", "--run-config", str(path), "--db", str(tmp_path / "b.db"),
                           "--chain", f"localchain:{tmp_path / 'chain.db'}", "--hotkey-uri", "//bridge",
                           "--s3-endpoint", s3.endpoint, "--s3-bucket", s3.bucket, "--s3-access-key", ACCESS_KEY,
                           "--s3-secret-key", SECRET_KEY, "--port", "1", "--log-level", "warning"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert f"model.vocab_size={VOCAB + 1}" in lines[0] and f"vocab {VOCAB}" in lines[0]
    assert f"set model.vocab_size: {VOCAB}" in lines[0]
