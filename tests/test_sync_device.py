"""The miner runs the sharded sync's arithmetic on its GPU only when the GPU reproduces the CPU's
bits; otherwise (a difference, or the check failing) it merges on the CPU."""
import torch

from neurons import sync_device


def test_the_cpu_reproduces_itself_and_is_used_as_is():
    assert sync_device.check_same_bits(torch.device("cpu"), n=4099) == ""
    assert sync_device.pick_sync_device("cpu") == torch.device("cpu")


def test_a_device_that_differs_or_cannot_be_checked_falls_back_to_the_cpu(monkeypatch, caplog):
    monkeypatch.setattr(sync_device, "check_same_bits", lambda dev: "encode int4/64")
    with caplog.at_level("WARNING"):
        assert sync_device.pick_sync_device("cuda:0") == torch.device("cpu")
    assert "encode int4/64" in caplog.text

    def broken(dev):
        raise RuntimeError("CUDA out of memory")
    monkeypatch.setattr(sync_device, "check_same_bits", broken)
    assert sync_device.pick_sync_device("cuda:0") == torch.device("cpu")
    monkeypatch.setattr(sync_device, "check_same_bits", lambda dev: "")
    assert sync_device.pick_sync_device("cuda:0") == torch.device("cuda:0")


def test_the_check_notices_a_device_whose_arithmetic_differs(monkeypatch):
    real, calls = sync_device.encode, []

    def encode(x, c):  # the check encodes on the CPU first, then on the device: make the second differ
        calls.append(c)
        blob = real(x, c)
        return blob if len(calls) % 2 else blob[:-1] + bytes([blob[-1] ^ 1])
    monkeypatch.setattr(sync_device, "encode", encode)
    assert sync_device.check_same_bits(torch.device("cpu"), n=4099) == "encode fp32/64"
