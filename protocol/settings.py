"""One configuration scheme for the bridge, the miner and the validator (pydantic-settings).

Every setting is a field of a `BaseSettings` model and can come from, highest precedence first:
a command-line flag, an environment variable `RESBM_<FIELD>`, a `.env` file (the working
directory's, or the one `--env-file` names), or the field's default. Flag names are
bittensor-style (`--wallet.name`, `--subtensor.network`, `--logging.debug`); the variable is the
flag upper-cased with dots and dashes turned into underscores (`--wallet.name` <- RESBM_WALLET_NAME).
"""
from __future__ import annotations

import argparse
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence, TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from protocol.exits import Exit, Misconfigured

__all__ = ["ENV_PREFIX", "DEFAULT_NETUID", "DEFAULT_BRIDGE_PORT", "DEFAULT_BRIDGE_URL", "flag",
           "CommonSettings", "env_name", "build_parser", "load_settings", "setup_logging"]

ENV_PREFIX = "RESBM_"
DEFAULT_NETUID = 1
DEFAULT_BRIDGE_PORT = 8600
DEFAULT_BRIDGE_URL = f"http://127.0.0.1:{DEFAULT_BRIDGE_PORT}"

S = TypeVar("S", bound="CommonSettings")


def flag(default: Any, help: str, name: Optional[str] = None, aliases: Sequence[str] = (),
         choices: Optional[Sequence[str]] = None, repeat: bool = False) -> Any:
    """A settings field with its help text, its flag name (default: the field name with dashes)
    and deprecated alias flags; `repeat`: the flag may be given several times (a str field
    then holds the values comma-separated, as its environment variable does)."""
    extra = {"flag": name, "aliases": list(aliases), "choices": list(choices) if choices else None,
             "repeat": repeat}
    return Field(default, description=help, json_schema_extra=extra)


def env_name(flag_name: str) -> str:
    """Environment variable that sets `flag_name` (e.g. `wallet.name` -> RESBM_WALLET_NAME)."""
    return ENV_PREFIX + flag_name.replace(".", "_").replace("-", "_").upper()


class CommonSettings(BaseSettings):
    """Settings every process takes: chain, subnet, wallet and logging."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", extra="ignore",
                                      env_file_encoding="utf-8", env_ignore_empty=True)

    subtensor_network: str = flag(
        "finney", "finney, test, local (a subtensor node on 127.0.0.1:9944), a ws(s):// URL, or "
        "localchain:PATH (a local SQLite chain made with resbm-localchain)", name="subtensor.network")
    subtensor_chain_endpoint: str = flag(
        "", "ws(s):// endpoint of a subtensor node; overrides --subtensor.network",
        name="subtensor.chain_endpoint")
    netuid: int = flag(DEFAULT_NETUID, "subnet uid")
    wallet_name: str = flag("default", "bittensor wallet (coldkey) name", name="wallet.name")
    wallet_hotkey: str = flag("default", "hotkey name inside the wallet", name="wallet.hotkey")
    wallet_path: str = flag(str(Path.home() / ".bittensor" / "wallets"),
                            "directory holding bittensor wallets", name="wallet.path")
    logging_debug: bool = flag(False, "verbose logging", name="logging.debug")
    logging_trace: bool = flag(False, "most verbose logging (every request)", name="logging.trace")

    moved_flags: ClassVar[dict[str, str]] = {}
    """Flags this process no longer takes -> where the setting lives now; giving one (or its
    RESBM_ variable) is a one-line usage error saying so, never a silently ignored value."""

    @property
    def network(self) -> str:
        """The chain to open: the endpoint when given, else the network name."""
        return self.subtensor_chain_endpoint or self.subtensor_network


def _flag_of(name: str, info: Any) -> tuple[str, list[str], Optional[list[str]]]:
    extra = info.json_schema_extra or {}
    return (extra.get("flag") or name.replace("_", "-"), list(extra.get("aliases") or []),
            extra.get("choices"))


def _scalar_type(annotation: Any) -> Any:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if args else str
    return annotation


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one `Misconfigured` line, like every other mistake."""

    def error(self, message: str) -> typing.NoReturn:
        raise Misconfigured(Exit.USAGE, f"{message}; see {self.prog} --help")


def _moved(flag_name: str, where: str) -> str:
    return f"--{flag_name} (or {env_name(flag_name)}) is not a setting of this process: {where}"


class _MovedFlag(argparse.Action):
    """A flag that moved elsewhere: using it stops with the one line saying where."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Optional[str] = None) -> None:
        raise Misconfigured(Exit.USAGE, _moved(self.dest, self.const))


def _refuse_moved_env(model: type[CommonSettings], env_file: str) -> None:
    import os
    if not getattr(model, "moved_flags", None):
        return
    from dotenv import dotenv_values
    dotenv = dotenv_values(env_file) if Path(env_file).is_file() else {}
    for name, where in getattr(model, "moved_flags", {}).items():
        if env_name(name) in os.environ or env_name(name) in dotenv:
            raise Misconfigured(Exit.USAGE, _moved(name, where))


def build_parser(model: type[CommonSettings], prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of `model`; flags not given stay unset so the
    environment, `.env` and defaults fill them (in that order)."""
    p = _Parser(prog=prog, description=description, argument_default=argparse.SUPPRESS,
                                epilog="Every flag can also be set as RESBM_<FLAG> in the environment "
                                "or a .env file (flag > environment > .env > default).")
    p.add_argument("--env-file", default=argparse.SUPPRESS,
                   help="file of RESBM_* settings (default: .env in the working directory) [RESBM_ENV_FILE]")
    for name, info in model.model_fields.items():
        primary, aliases, choices = _flag_of(name, info)
        names = ["--" + primary] + ["--" + a for a in aliases]
        help_text = f"{info.description} [{env_name(primary)}, default: {info.default!r}]"
        typ = _scalar_type(info.annotation)
        if typ is bool:
            p.add_argument(*names, dest=name, action="store_true", help=help_text)
        elif (info.json_schema_extra or {}).get("repeat"):
            p.add_argument(*names, dest=name, action="append", help=help_text,
                           metavar=primary.split(".")[-1].upper().replace("-", "_"))
        else:
            p.add_argument(*names, dest=name, type=typ, choices=choices, help=help_text,
                           metavar=primary.split(".")[-1].upper().replace("-", "_"))
    for name, where in getattr(model, "moved_flags", {}).items():
        p.add_argument("--" + name, dest=name, action=_MovedFlag, const=where, nargs="?", help=argparse.SUPPRESS)
    return p


def load_settings(model: type[S], argv: Optional[Sequence[str]] = None, *, prog: str = "",
                  description: str = "") -> S:
    """Parse flags and build `model` with flag > environment > `.env` > default; a bad value
    raises `Misconfigured` naming the flag and its variable."""
    import os
    args = vars(build_parser(model, prog, description).parse_args(
        list(sys.argv[1:] if argv is None else argv)))
    args = {k: ",".join(v) if isinstance(v, list) else v for k, v in args.items()}  # repeated
    env_file = args.pop("env_file", None) or os.environ.get(ENV_PREFIX + "ENV_FILE") or ".env"
    if env_file != ".env" and not Path(env_file).is_file() and env_file != os.devnull:
        raise Misconfigured(Exit.CONFIG_FILE, f"--env-file {env_file} does not exist; "
                            "give an existing file or leave the flag out")
    _refuse_moved_env(model, env_file)
    try:
        return model(_env_file=env_file, **args)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        info = model.model_fields.get(field)
        primary = _flag_of(field, info)[0] if info else field
        raise Misconfigured(Exit.USAGE, f"--{primary} (or {env_name(primary)}): {err['msg']}, "
                            f"got {err.get('input')!r}") from None


def setup_logging(settings: CommonSettings, name: str) -> logging.Logger:
    """One readable line per event on stderr; `--logging.trace` also shows HTTP and SDK chatter."""
    level = logging.DEBUG if (settings.logging_debug or settings.logging_trace) else logging.INFO
    logging.basicConfig(level=level, format=f"%(asctime)s {name} %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    if not settings.logging_trace:
        for noisy in ("httpx", "httpcore", "botocore", "boto3", "urllib3", "websockets",
                      "bittensor", "uvicorn.access"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    return logging.getLogger(name)
