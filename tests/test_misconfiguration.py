"""Every bad configuration an operator can make ends in one `error:` line and its own exit code
(or a logged retry with back-off, then that line), never a traceback: real processes against a
real bridge, rclone S3 server and LocalChain file."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from protocol.exits import Exit
from protocol.routes import route
from tests.servers import REPO, free_port, make_chain, start_bridge, tiny_run_config

WALLETS = ("miner", "nopermit", "stranger", "other")


def _wallets(root: Path) -> dict[str, object]:
    import bittensor as bt
    from bittensor.sp_core import Keypair
    out = {}
    for name in WALLETS:
        w = bt.Wallet(name=name, hotkey="default", path=str(root))
        w.regenerate_coldkey(mnemonic=Keypair.generate_mnemonic(12), use_password=False, overwrite=True,
                             suppress=True)
        w.regenerate_hotkey(mnemonic=Keypair.generate_mnemonic(12), use_password=False, overwrite=True,
                            suppress=True)
        out[name] = w
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, s3_server):
    """A chain (subnets 1 and 2), wallets, and a bridge for netuid 1."""
    root = tmp_path_factory.mktemp("misconfig")
    wallets = _wallets(root / "wallets")
    chain, _ = make_chain(root / "chain.db", miners=0, validators=0)
    chain.register(wallets["miner"])
    chain.register(wallets["nopermit"])  # registered, no stake: no validator permit
    from bittensor.sp_core import Keypair

    from protocol.chain import LocalChain
    other = LocalChain(root / "chain.db", netuid=2)
    other.create_subnet(Keypair.create_from_uri("//owner2"))
    other.register(wallets["other"])
    bridge = start_bridge(root / "bridge", tiny_run_config(run_id="misconfig"), root / "chain.db", s3_server)
    good = tiny_run_config(run_id="misconfig2")
    (root / "run.yaml").write_text(yaml.safe_dump(good))
    (root / "badmodel.yaml").write_text(yaml.safe_dump(dict(good, model={"d_model": 32, "n_stages": 2})))
    (root / "shards.yaml").write_text(yaml.safe_dump(dict(good, sync_mode="sharded", sync_shards=4096,
                                                          sync_block=65536)))
    yield {"root": root, "bridge": bridge, "s3": s3_server, "chain": root / "chain.db", "wallets": wallets}
    bridge.stop()
    chain.close()
    other.close()


def _run(argv: list[str], cwd: Path, env_extra: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESBM_")}
    env.update(PYTHONPATH=str(REPO), **(env_extra or {}))
    return subprocess.run([sys.executable, *argv], cwd=str(cwd), env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _flag(key: str) -> str:
    """`wallet__hotkey` -> --wallet.hotkey, `s3_secret_key` -> --s3-secret-key."""
    return "--" + (key.replace("__", ".") if "__" in key else key.replace("_", "-"))


def _neuron(w: dict, script: str, wallet: str = "miner", **over: str) -> list[str]:
    flags = {"--wallet.name": wallet, "--wallet.hotkey": "default",
             "--wallet.path": str(w["root"] / "wallets"), "--netuid": "1",
             "--subtensor.network": f"localchain:{w['chain']}", "--bridge.url": w["bridge"].url,
             "--device": "cpu", "--bridge.wait": "3"}
    flags.update({_flag(k): v for k, v in over.items()})
    return [str(REPO / "neurons" / script)] + [x for kv in flags.items() for x in kv]


def _bridge(w: dict, **over: str) -> list[str]:
    s3 = w["s3"]
    flags = {"--run-config": str(w["root"] / "run.yaml"), "--port": str(free_port()),
             "--db": str(w["root"] / f"b{free_port()}.sqlite"),
             "--subtensor.network": f"localchain:{w['chain']}", "--netuid": "1", "--hotkey-uri": "//bridge",
             "--s3-endpoint": s3.endpoint, "--s3-access-key": s3.access_key,
             "--s3-secret-key": s3.secret_key, "--s3-wait": "3"}
    flags.update({_flag(k): v for k, v in over.items()})
    return ["-m", "bridge"] + [x for kv in flags.items() for x in kv]


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _no_cuda_device() -> str:
    import torch
    return "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


# (id, argv builder, exit code, words the error line must hold, a retry must be logged first)
CASES = [
    ("miner: nothing listens at the bridge URL",
     lambda w: _neuron(w, "miner.py", bridge__url=f"http://127.0.0.1:{free_port()}"),
     Exit.BRIDGE_UNREACHABLE, "no bridge answers", True),
    ("miner: the bridge URL is another server",
     lambda w: _neuron(w, "miner.py", bridge__url=w["s3"].endpoint),
     Exit.NOT_A_BRIDGE, "not a ResBM bridge", False),
    ("miner: a netuid with no subnet",
     lambda w: _neuron(w, "miner.py", netuid="5"), Exit.NETUID, "subnet 5 does not exist", False),
    ("miner: registered on another netuid than the bridge serves",
     lambda w: _neuron(w, "miner.py", wallet="other", netuid="2"), Exit.BRIDGE_MISMATCH,
     "serves netuid 1", False),
    ("miner: unknown network name",
     lambda w: _neuron(w, "miner.py", subtensor__network="fney"), Exit.NETWORK_NAME,
     "unknown network 'fney'", False),
    ("miner: local with no subtensor node",
     lambda w: _neuron(w, "miner.py", subtensor__network="local"), Exit.CHAIN_UNREACHABLE,
     "no chain node answers for 'local'", False),
    ("validator: a chain endpoint with no node",
     lambda w: _neuron(w, "validator.py", subtensor__chain_endpoint=f"ws://127.0.0.1:{free_port()}"),
     Exit.CHAIN_UNREACHABLE, "no chain node answers", False),
    ("miner: localchain file missing",
     lambda w: _neuron(w, "miner.py", subtensor__network=f"localchain:{w['root']}/typo.db"),
     Exit.LOCALCHAIN_MISSING, "does not exist", False),
    ("validator: localchain names a file that is not a chain",
     lambda w: _neuron(w, "validator.py", subtensor__network=f"localchain:{w['root']}/run.yaml"),
     Exit.LOCALCHAIN_MISSING, "is not a local chain file", False),
    ("miner: wallet hotkey missing",
     lambda w: _neuron(w, "miner.py", wallet__hotkey="nothere"), Exit.WALLET, "not found", False),
    ("miner: hotkey not registered",
     lambda w: _neuron(w, "miner.py", wallet="stranger"), Exit.NOT_REGISTERED, "is not registered", False),
    ("miner: a device this machine lacks",
     lambda w: _neuron(w, "miner.py", device=_no_cuda_device()), Exit.DEVICE, "--device cuda", False),
    ("miner: a --max-memory it cannot read (checked before taking a stage, like a bad device)",
     lambda w: _neuron(w, "miner.py", max_memory="lots"), Exit.USAGE, "--max-memory 'lots'", False),
    ("validator: no validator permit",
     lambda w: _neuron(w, "validator.py", wallet="nopermit"), Exit.NO_PERMIT, "no validator permit", False),
    ("validator: an --env-file that does not exist",
     lambda w: _neuron(w, "validator.py", env_file=str(w["root"] / "prod.env")), Exit.CONFIG_FILE,
     "prod.env does not exist", False),
    ("validator: a flag with a bad value",
     lambda w: _neuron(w, "validator.py", audit__fraction="lots"), Exit.USAGE, "--audit.fraction", False),
    ("bridge: run-config file missing",
     lambda w: _bridge(w, run_config=str(w["root"] / "nope.yaml")), Exit.CONFIG_FILE,
     "nope.yaml does not exist", False),
    ("bridge: a run config whose model cannot be built",
     lambda w: _bridge(w, run_config=str(w["root"] / "badmodel.yaml")), Exit.CONFIG_FILE,
     "model: bottleneck_ratio", False),
    ("bridge: more sync shards than a stage has blocks",
     lambda w: _bridge(w, run_config=str(w["root"] / "shards.yaml")), Exit.CONFIG_FILE,
     "lower sync_shards", False),
    ("bridge: S3 unreachable",
     lambda w: _bridge(w, s3_endpoint=f"http://127.0.0.1:{free_port()}"), Exit.S3_UNREACHABLE,
     "no S3 server answers", True),
    ("bridge: a --db PostgreSQL server that does not answer",
     lambda w: _bridge(w, db=f"postgresql://resbm@127.0.0.1:{free_port()}/state"), Exit.DATABASE,
     "PostgreSQL at postgresql://resbm@127.0.0.1", False),
    ("miner: none of several bridge URLs answers",
     lambda w: _neuron(w, "miner.py", bridge__url=f"http://127.0.0.1:{free_port()},"
                                                  f"http://127.0.0.1:{free_port()}"),
     Exit.BRIDGE_UNREACHABLE, "no bridge answers at any of", True),
    ("bridge: wrong S3 secret",
     lambda w: _bridge(w, s3_secret_key="wrong"), Exit.S3_CREDENTIALS, "rejected the credentials", False),
    ("bridge: unknown network name",
     lambda w: _bridge(w, subtensor__network="fney"), Exit.NETWORK_NAME, "unknown network", False),
    ("bridge: a netuid with no subnet",
     lambda w: _bridge(w, netuid="9"), Exit.NETUID, "subnet 9 does not exist", False),
    ("bridge: localchain file missing",
     lambda w: _bridge(w, subtensor__network=f"localchain:{w['root']}/typo.db"),
     Exit.LOCALCHAIN_MISSING, "does not exist", False),
    ("local_cli: owner wallet without its hotkey",
     lambda w: ["-m", "protocol.chain.local_cli", "--db", str(w["root"] / "new.db"),
                "--wallet.path", str(w["root"] / "wallets"), "create", "--owner", "wallet:miner/nothere"],
     Exit.WALLET, "hotkey 'nothere' of wallet 'miner' not found", False),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_configuration_gets_one_line_and_its_exit_code(world, case):
    _, argv, code, words, retried = case
    if "local with no subtensor node" in case[0]:
        assert _port_is_free(9944), "a node listens on 127.0.0.1:9944; this case needs none"
    health_before = httpx.get(world["bridge"].url + route("health").path).json()
    p = _run(argv(world), cwd=world["root"])
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode == int(code), (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert len(errors) == 1 and words in errors[0], p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == errors[0]  # the last thing said
    assert ("retrying in" in p.stderr) == retried, p.stderr[-2000:]
    assert httpx.get(world["bridge"].url + route("health").path).json() == health_before  # bridge unharmed
    if "device" in case[0]:  # checked before registering: the bridge never saw this hotkey
        import sqlite3
        with sqlite3.connect(world["bridge"].db) as db:
            hotkeys = {hk for (hk,) in db.execute("SELECT hotkey FROM miners")}
        assert world["wallets"]["miner"].hotkey.ss58_address not in hotkeys
    if "local_cli" in case[0]:
        assert not (world["root"] / "new.db").exists()  # nothing half-made left behind


def test_exit_codes_are_distinct():
    codes = [int(c) for c in Exit]
    assert len(codes) == len(set(codes))
    assert len({c[2] for c in CASES}) >= 15


def test_environment_and_env_file_reach_the_bridge_too(world, tmp_path):
    """One scheme: a bad RESBM_* variable or .env value is reported like a bad flag, for the bridge."""
    (tmp_path / ".env").write_text(f"RESBM_RUN_CONFIG={world['root'] / 'from-dotenv.yaml'}\n")
    argv = [a for a in _bridge(world) if a not in ("--run-config", str(world["root"] / "run.yaml"))]
    p = _run(argv, cwd=tmp_path)
    assert p.returncode == Exit.CONFIG_FILE and "from-dotenv.yaml does not exist" in p.stderr, p.stderr
    p = _run(argv, cwd=tmp_path, env_extra={"RESBM_RUN_CONFIG": str(world["root"] / "from-env.yaml")})
    assert "from-env.yaml does not exist" in p.stderr, p.stderr  # environment beats .env
    p = _run(argv, cwd=tmp_path, env_extra={"RESBM_RATE": "fast"})
    assert p.returncode == Exit.USAGE and "RESBM_RATE" in p.stderr and "Traceback" not in p.stderr


def test_validator_flags_default_to_the_loop_settings():
    from neurons.validator import ValidatorConfig
    from neurons.validator_loop import ValidatorSettings
    d, cfg = ValidatorSettings(), ValidatorConfig.model_fields
    for name in ("state_path", "audit_fraction", "audit_max_seconds", "burn_share", "ema_alpha",
                 "penalty_windows", "poll_seconds", "seed"):
        assert cfg[name].default == getattr(d, name), name


def test_cheats_live_only_in_the_drill_miner():
    from drills.cheaters import CHEATERS
    from drills.miner import DrillMinerSettings
    from neurons.miner import MinerSettings
    assert "cheat" not in MinerSettings.model_fields
    assert all(c in DrillMinerSettings.model_fields["cheat"].description for c in CHEATERS)


def test_old_bridge_flags_still_work():
    """`--chain` and `--log-level` (the bridge's old spellings) map onto the shared flags."""
    from bridge.__main__ import _translate
    assert _translate(["--chain", "finney", "--log-level=DEBUG", "--port", "1"]) == [
        "--subtensor.network", "finney", "--logging.debug", "--port", "1"]
    assert _translate(["--log-level", "WARNING"]) == []


def test_contracts_document_every_exit_code():
    import re
    text = (REPO / "docs" / "CONTRACTS.md").read_text()
    section = text.split("### Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = {int(n) for n in re.findall(r"^\| (\d+) \|", section, re.M)}
    assert documented == {int(c) for c in Exit if c != Exit.OK}
