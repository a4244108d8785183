"""The trained model leaves a real subnet (sharded sync: rclone S3, LocalChain, the bridge process,
in-process miners, a validator): the README's three commands run as written, the export gives
bit-identical logits to the replicas' own stages, earlier rounds replay exactly the updates the
bridge decided, the bucket alone exports the same bytes, refusals are one line with their exit
code and leave nothing behind, and the validator's held-out loss is the dashboard's."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import boto3
import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from neurons.transfer import ObjectTransfer
from neurons.validator_loop import Validator, ValidatorSettings
from protocol.exits import Exit
from protocol.messages import StageRound
from protocol.keys import ModelKey
from protocol.routes import route
from resbm import codec, data
from resbm.evaluate import evaluate_lm, held_out_batches
from resbm.export import load_export
from resbm.stages import pipeline_logits
from scripts.export_model import main as export_main
from tests.harness.validator_subnet import run_subnet
from tests.servers import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROUNDS = 3
MINERS = [(f"m{i}", "honest", torch.float32, i % 2) for i in range(4)]  # two replicas per stage
RUN = dict(total_rounds=ROUNDS, samples_per_round=8, sync_mode="sharded", sync_shards=2, sync_mergers=2,
           sync_codec="int8", sync_merged_codec="int8", checkpoint_every=10, val_tokens=512)
_GUIDE = re.compile(r"<!-- model-guide:start -->\s*```bash\n(.*?)```\s*<!-- model-guide:end -->", re.S)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """A finished sharded run (only its last round writes a checkpoint), validated once."""
    tmp = tmp_path_factory.mktemp("export")
    with run_subnet(tmp, MINERS, **RUN) as n:
        v = Validator(n["client"], ObjectTransfer(), n["chain"], n["keys"]["validators"][0],
                      ValidatorSettings(state_path=str(tmp / "validator.json")))
        v.tick()
        yield dict(n, validator=v, url=n["bridge"].url)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESBM_")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(REPO))
    return env


def _cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env={**_env(), **env}, capture_output=True, text=True, timeout=300)


def _export(capsys, *args: str) -> subprocess.CompletedProcess:
    """resbm-export in this process (its exit code and output, as a process would give them)."""
    capsys.readouterr()
    code = export_main(list(args))
    got = capsys.readouterr()
    return subprocess.CompletedProcess(["resbm-export", *args], code, got.out, got.err)


def _windows_loss(model, tokens: int) -> float:
    return evaluate_lm(lambda t: model(t), held_out_batches(data.load(), tokens, model.cfg.seq_len)).loss


def test_the_readmes_three_commands_export_generate_and_evaluate(net, tmp_path):
    block = _GUIDE.search((REPO / "README.md").read_text()).group(1)
    lines = [ln for ln in block.splitlines() if ln.strip()]
    assert [ln.split()[0] for ln in lines] == ["resbm-export", "resbm-generate", "resbm-eval"]
    (tmp_path / "resbm").symlink_to(REPO / "resbm")  # the guide runs from a checkout's root
    outs = []
    for line in lines:  # RESBM_TOKENS: resbm-eval's --tokens from the environment, to keep the test short
        r = _cli(["bash", "-euo", "pipefail", "-c", line.replace("http://127.0.0.1:8600", net["url"])], tmp_path,
                 RESBM_TOKENS="2048")
        assert r.returncode == 0, f"{line}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        assert "Traceback" not in r.stderr
        outs.append(r)
    ex = load_export(tmp_path / "my-model")
    assert ex.info["round"] == ROUNDS - 1 and ex.info["run_id"] == "val-test"
    card = (tmp_path / "my-model" / "README.md").read_text()
    for needle in ("run `val-test`", f"after round {ROUNDS - 1}", "tokens trained: 768", "validation loss (validators",
                   "boundary `resbm` / `postnorm`", "x less)", ex.info["stages"][0]["sha256"]):
        assert needle in card, needle
    prompt = "To be, or not to be"
    assert outs[1].stdout.startswith(prompt) and len(outs[1].stdout.strip()) > len(prompt)
    m = re.search(r"loss ([0-9.]+) nats/token \| perplexity ([0-9.]+) \| bits per byte ([0-9.]+)", outs[2].stdout)
    assert m, outs[2].stdout
    assert "2,048 tokens" in outs[2].stdout
    assert float(m.group(1)) == pytest.approx(_windows_loss(ex.model, 2048), abs=1e-4)
    assert float(m.group(2)) == pytest.approx(math.exp(float(m.group(1))), rel=1e-3)
    assert 0 < float(m.group(3)) < float(m.group(1)) / math.log(2)  # more than one byte per token


def test_the_export_gives_the_replicas_logits_bit_for_bit(net, tmp_path):
    assert export_main(["--bridge", net["url"], "--out", str(tmp_path / "m")]) == 0
    ex = load_export(tmp_path / "m")
    cfg = ex.config
    tokens, _ = data.batch(11, 2, 3, cfg.seq_len)
    with torch.no_grad():
        want = ex.model(tokens)

    def wire(z):  # what the next stage receives: the code encoded and decoded as on the network
        return codec.decode(codec.encode(z, cfg.wire_codec), z.shape, cfg.wire_codec, 1 << 30)
    replicas = {s: [m.worker.module for m in net["miners"].values() if m.worker.stage_index == s] for s in (0, 1)}
    assert len(replicas[0]) == len(replicas[1]) == 2
    for first in replicas[0]:
        for last in replicas[1]:  # fp32 on CPU, the same kernels: exact, not merely close
            assert torch.equal(pipeline_logits([first, last], tokens, wire), want)


def test_an_earlier_round_replays_exactly_the_updates_the_bridge_decided(net, tmp_path):
    assert export_main(["--bridge", net["url"], "--round", "1", "--out", str(tmp_path / "r1")]) == 0
    info = json.loads((tmp_path / "r1" / "export.json").read_text())
    assert info["round"] == 1 and info["latest_round"] == ROUNDS - 1 and info["samples_trained"] == 16
    for st in info["stages"]:
        assert st["sha256"] is None and st["checkpoint_round"] == 0 and st["updates"] == 2  # init + rounds 0, 1
        for rnd, shas in enumerate(st["update_sha256"]):
            view = net["client"].call(route("sync_view"), StageRound(round=rnd, stage=st["stage"]))
            assert shas == [d.sha256 if d else None for d in view.decided]
    latest = tmp_path / "latest"
    assert export_main(["--bridge", net["url"], "--out", str(latest)]) == 0
    r1, last = load_export(tmp_path / "r1").model, load_export(latest).model
    assert any(not torch.equal(a, b) for a, b in zip(r1.state_dict().values(), last.state_dict().values()))
    s3 = net["s3"]  # the bucket alone: the copy the bridge wrote after the last round
    assert export_main(["--s3", f"s3://{s3.bucket}/runs/val-test", "--s3-endpoint", s3.endpoint,
                        "--s3-access-key", s3.access_key, "--s3-secret-key", s3.secret_key,
                        "--out", str(tmp_path / "from-s3")]) == 0
    assert (tmp_path / "from-s3" / "model.safetensors").read_bytes() == (latest / "model.safetensors").read_bytes()
    assert export_main(["--s3", f"s3://{s3.bucket}/runs/val-test", "--round", "1", "--s3-endpoint", s3.endpoint,
                        "--s3-access-key", s3.access_key, "--s3-secret-key", s3.secret_key,
                        "--out", str(tmp_path / "from-s3-r1")]) == 0  # the copy written when round 2 began
    assert (tmp_path / "from-s3-r1" / "model.safetensors").read_bytes() == (tmp_path / "r1" / "model.safetensors").read_bytes()


def _one_line_error(r: subprocess.CompletedProcess, code: int, *words: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[-1], lines[-1]


def test_refusals_are_one_line_with_an_exit_code_and_leave_nothing(net, tmp_path, capsys):
    url, s3 = net["url"], net["s3"]
    out = tmp_path / "out"
    _one_line_error(_cli(["resbm-export", "--bridge", url, "--round", "99", "--out", str(out)], tmp_path),
                    Exit.MODEL_UNAVAILABLE, "round 99", f"latest is round {ROUNDS - 1}")  # a real process
    _one_line_error(_export(capsys, "--out", str(out)), Exit.USAGE, "--bridge")
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _one_line_error(_export(capsys, "--bridge", url, "--out", str(out)), Exit.USAGE, "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    _one_line_error(_export(capsys, "--bridge", "http://127.0.0.1:9", "--out", str(tmp_path / "x")),
                    Exit.BRIDGE_UNREACHABLE)
    # every copy of one decided update of round 0 corrupted: rounds 0 and 1 no longer rebuild
    folder = Path(s3.root) / s3.bucket / "runs/val-test/sync/r0/s1/merged/00000"
    copies = {p: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert copies
    try:
        for p, b in copies.items():
            p.write_bytes(bytes([b[0] ^ 0xFF]) + b[1:])
        r = _export(capsys, "--bridge", url, "--round", "1", "--out", str(tmp_path / "bad"))
        _one_line_error(r, Exit.MODEL_UNAVAILABLE, "stage 1", "hash")
    finally:
        for p, b in copies.items():
            p.write_bytes(b)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.partial-*"))
    # a description of the model missing a stage (say, a doctored copy) is refused by name
    client = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.access_key,
                          aws_secret_access_key=s3.secret_key, region_name="us-east-1")
    doc = json.loads(client.get_object(Bucket=s3.bucket, Key=ModelKey("val-test").final)["Body"].read())
    doc["stages"] = doc["stages"][:1]
    client.put_object(Bucket=s3.bucket, Key=ModelKey("doctored").final, Body=json.dumps(doc).encode())
    bucket = ["--s3-endpoint", s3.endpoint, "--s3-access-key", s3.access_key, "--out", str(tmp_path / "d")]
    r = _export(capsys, "--s3", f"s3://{s3.bucket}/runs/doctored", "--s3-secret-key", s3.secret_key, *bucket)
    _one_line_error(r, Exit.MODEL_UNAVAILABLE, "stages [0]")
    r = _export(capsys, "--s3", f"s3://{s3.bucket}/runs/val-test", "--s3-secret-key", "wrong", *bucket)
    _one_line_error(r, Exit.S3_CREDENTIALS)
    assert not (tmp_path / "d").exists()


def test_the_validators_held_out_loss_is_the_dashboards_and_the_metrics(net, tmp_path):
    v, url = net["validator"], net["url"]
    assert sorted(v.live.reported) == list(range(ROUNDS))
    d = httpx.get(url + route("dashboard").path).json()
    assert [(p["round"], p["validators"], p["tokens"]) for p in d["val_curve"]] == [(r, 1, 512) for r in range(ROUNDS)]
    assert [p["loss"] for p in d["val_curve"]] == [v.live.reported[r] for r in range(ROUNDS)]
    assert len(d["loss_curve"]) == ROUNDS  # the training loss of the same rounds, next to it
    assert export_main(["--bridge", url, "--out", str(tmp_path / "m")]) == 0
    ex = load_export(tmp_path / "m")
    assert v.live.reported[ROUNDS - 1] == pytest.approx(_windows_loss(ex.model, 512), rel=1e-6)
    assert ex.info["validation"] == {"loss": v.live.reported[ROUNDS - 1], "validators": 1, "tokens": 512}
    prom = {s.name: s.value for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)
            for s in f.samples}
    assert prom["resbm_bridge_validation_loss"] == v.live.reported[ROUNDS - 1]
    assert prom["resbm_bridge_validation_round"] == ROUNDS - 1 and prom["resbm_bridge_validation_validators"] == 1
    assert prom["resbm_bridge_training_loss_round"] == ROUNDS - 1
    from protocol.bridge_client import BridgeClient
    from protocol.client import BridgeError
    from protocol.console import ValidationLossReport
    with pytest.raises(BridgeError) as e:  # other windows than the run's: not comparable, refused
        net["client"].call(route("validation_loss"), ValidationLossReport(round=0, loss=3.0, tokens=16))
    assert e.value.status == 400 and "512" in str(e.value)
    miner = BridgeClient(net["keys"]["miners"][0], url, net["bridge"].hotkey, max_tries=1)
    with pytest.raises(BridgeError) as e:
        miner.call(route("validation_loss"), ValidationLossReport(round=0, loss=0.01, tokens=512))
    assert e.value.status == 403
    assert httpx.get(url + route("dashboard").path).json()["val_curve"][0]["loss"] == v.live.reported[0]


def test_the_runs_dataset_is_read_from_the_bucket_next_to_its_manifest(net, tmp_path, monkeypatch):
    """With --s3 and a run whose dataset is a key in the bucket, the tokenizer comes from the bucket,
    verified against the manifest the run config pins."""
    from spec.dataset import DatasetRef
    from neurons.model_fetch import published_from_bridge
    from scripts.bucket_model import BucketObjects
    from scripts.export_model import run_dataset
    from scripts.prepare_dataset import upload_folder
    s3 = net["s3"]
    monkeypatch.setenv("RESBM_DATA_CACHE", str(tmp_path / "cache"))
    ref = DatasetRef(**upload_folder(data.default_data_dir(), f"s3://{s3.bucket}/datasets/bucket-test",
                                     s3.endpoint, (s3.access_key, s3.secret_key)))
    pm = published_from_bridge(net["url"])
    pm = pm.model_copy(update={"run": pm.run.model_copy(update={"dataset": ref})})
    client = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.access_key,
                          aws_secret_access_key=s3.secret_key, region_name="us-east-1")
    ds = run_dataset(pm, objects=BucketObjects(client, s3.bucket))
    got = ds.file_path(ds.manifest.tokenizer.name)
    assert got.read_bytes() == (data.default_data_dir() / "tokenizer.json").read_bytes()
    assert str(tmp_path / "cache") in str(got)  # fetched from the bucket, not read from the checkout
