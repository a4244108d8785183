"""Miner tests on a real subnet (tests/harness/miner_subnet.py): bad-input handling, settings,
device choice."""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import threading

import pytest
import torch

from neurons import miner_loop
from neurons.cli import env_name, load_settings
from neurons.miner import MinerSettings
from neurons.miner import build_parser as miner_parser
from neurons.transfer import ObjectTransfer
from resbm import codec
from resbm.device import pick_device
from tests.harness.miner_subnet import MinerThread, run_config, set_threads, start_subnet, wait_for
from tests.servers import REPO


def _corrupted(kind: str, t: torch.Tensor, wire_codec: str) -> tuple[bytes, str]:
    """(blob, sha256 reported to the bridge) of an output corrupted the way `kind` says."""
    honest = codec.encode(t, wire_codec)
    if kind == "bad_hash":  # the object changes after its sha256 was recorded
        blob = bytearray(honest)
        blob[len(blob) // 2] ^= 0xFF
        return bytes(blob), hashlib.sha256(honest).hexdigest()
    if kind == "bad_shape":  # a well-formed object of the same size but another shape
        b, s, k = t.shape
        blob = codec.encode(t.reshape(b, s * 2, k // 2), wire_codec)
    else:  # "nonfinite": a NaN in the values, with a valid inner checksum
        body = bytearray(honest[:-32])
        body[-2:] = b"\xc0\x7f"  # bf16 NaN
        blob = bytes(body) + hashlib.sha256(bytes(body)).digest()
    assert len(blob) == len(honest)
    return blob, hashlib.sha256(blob).hexdigest()


KINDS = ("bad_hash", "bad_shape", "nonfinite")


@pytest.mark.timeout(150)
def test_corrupted_input_is_reported_and_the_miner_keeps_working(tmp_path, monkeypatch, caplog):
    """One subnet, one round per corruption kind: the first output of round r is corrupted as
    KINDS[r] says (2 samples a round, so stage-0 outputs 0, 2, 4 are each round's first)."""
    set_threads()
    cfg = run_config(run_id="bad-inputs", samples_per_round=2, inner_steps_per_round=1,
                     total_rounds=len(KINDS), max_attempts=1)
    net = start_subnet(tmp_path, cfg, miners=2)
    outputs, corrupted = [], threading.Event()
    uploading = threading.local()  # set while the stage-0 miner's upload runs on this thread
    honest_encode = miner_loop.encode_output

    def faulty_encode(t: torch.Tensor, wire_codec: str) -> tuple[bytes, str]:
        if not getattr(uploading, "stage0", False):
            return honest_encode(t, wire_codec)
        i = len(outputs)
        outputs.append(i)
        if i % 2 == 0 and i // 2 < len(KINDS):
            corrupted.set()
            return _corrupted(KINDS[i // 2], t, wire_codec)
        return honest_encode(t, wire_codec)

    monkeypatch.setattr(miner_loop, "encode_output", faulty_encode)
    try:
        m0 = MinerThread(net, net.keys["miners"][0])
        m1 = MinerThread(net, net.keys["miners"][1])
        assert (m0.assignment.stage, m1.assignment.stage) == (0, 1)
        upload = m0.miner._upload_and_report

        def stage0_upload(*args) -> None:
            uploading.stage0 = True
            try:
                upload(*args)
            finally:
                uploading.stage0 = False

        m0.miner._upload_and_report = stage0_upload
        m0.start()
        wait_for(corrupted.is_set, 20, "the stage-0 miner to upload its first output")
        m1.start()
        m0.join(120), m1.join(120)
        metrics = net.metrics()
    finally:
        net.stop()
    n = len(KINDS)
    assert m1.miner.status.bad_inputs == n
    reported = [re.search(r"bad input \((\w+):", r.getMessage()) for r in caplog.records]
    assert sorted(m[1] for m in reported if m) == sorted(KINDS), "each kind reported once, by its reason"
    # the bridge checked each object and charged its producer; with max_attempts=1 the redo
    # budget is spent, so each such sample ends under that reason, and nothing else is lost
    assert metrics["abandon_reasons"] == {"bad output after 1 attempts": n}, metrics["abandon_reasons"]
    assert metrics["completed_total"] == n and metrics["abandoned_total"] == n
    by_key = {m["hotkey"]: m for m in metrics["miners"]}
    assert by_key[net.keys["miners"][0].ss58_address]["bad_outputs"] == n
    assert by_key[net.keys["miners"][1].ss58_address]["false_claims"] == 0
    # and the miner that saw the bad objects kept working through every round
    assert m1.miner.state.round == n and m1.miner.status.hops_done == n


def test_env_example_documents_every_setting():
    from bridge.__main__ import build_parser as bridge_parser
    from neurons.validator import build_parser as validator_parser
    names = set()
    for parser in (miner_parser(), validator_parser(), bridge_parser()):
        names |= {env_name(a.option_strings[0].lstrip("-")) for a in parser._actions
                  if a.option_strings and a.dest != "help" and a.help != argparse.SUPPRESS}  # not moved ones
    text = (REPO / ".env.example").read_text()
    documented = set(re.findall(r"^#?\s*(RESBM_[A-Z0-9_]+)=", text, flags=re.M))
    assert documented == names, (sorted(names - documented), sorted(documented - names))


def test_env_file_sets_flags_and_command_line_wins(tmp_path):
    env_file = tmp_path / "miner.env"
    env_file.write_text("RESBM_MAX_HOPS=7\nRESBM_WALLET_NAME=from-env\nRESBM_LOGGING_DEBUG=true\n")
    saved = dict(os.environ)
    try:
        for k in [k for k in os.environ if k.startswith("RESBM_")]:
            del os.environ[k]
        os.environ["RESBM_THREADS"] = "3"
        os.environ["RESBM_MAX_HOPS"] = "5"  # the environment beats the .env file
        args = load_settings(MinerSettings, ["--env-file", str(env_file), "--wallet.name", "from-flag"])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert args.max_hops == 5 and args.threads == 3 and args.logging_debug is True
    assert args.wallet_name == "from-flag"
    assert args.dtype == "float32"  # untouched default


def test_pick_device_prefers_an_accelerator_unless_named():
    assert str(pick_device("cpu")) == "cpu"
    want = "cuda" if torch.cuda.is_available() else (
        "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu")
    assert str(pick_device("auto")) == want


def _flaky_server(fail_first: int, body: bytes):
    """A loopback HTTP server: the first `fail_first` GETs answer 503, then 200 with `body`; PUT 403."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    calls = {"GET": 0, "PUT": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def do_GET(self):
            calls["GET"] += 1
            code = 503 if calls["GET"] <= fail_first else 200
            data = b"busy" if code == 503 else body
            self.send_response(code)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_PUT(self):
            calls["PUT"] += 1
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(403)
            self.send_header("content-length", "0")
            self.end_headers()

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, calls, f"http://127.0.0.1:{srv.server_address[1]}/obj"


def test_transfer_retries_transient_errors_and_not_permanent_ones():
    from neurons.transfer import TransferError
    srv, calls, url = _flaky_server(2, b"x" * 100)
    t = ObjectTransfer(tries=4)
    try:
        assert t.get(url, max_bytes=100) == b"x" * 100
        assert calls["GET"] == 3 and t.stats.retries == 2 and t.stats.bytes_down == 100
        with pytest.raises(TransferError, match="more than the 99 allowed") as big:  # size cap: no retry
            t.get(url, max_bytes=99)
        assert big.value.status == 413 and calls["GET"] == 4
        with pytest.raises(TransferError, match="HTTP 403") as denied:  # a refused upload is not retried
            t.put(url, b"y" * 10)
        assert denied.value.status == 403 and calls["PUT"] == 1 and t.stats.bytes_up == 0
    finally:
        t.close()
        srv.shutdown()
