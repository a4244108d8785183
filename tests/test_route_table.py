"""The bridge binds each route of protocol.routes.ROUTES to its handler in one table
(bridge.app.route_handlers), by the route's name; bridge.web.mount refuses a table that misses a
route or names one that does not exist."""
from __future__ import annotations

import pytest
from fastapi import FastAPI

from bridge.app import route_handlers
from bridge.hop_api import HopApi
from bridge.merge_api import MergeApi
from bridge.shard_api import ShardApi
from bridge.web import mount
from protocol.routes import ROUTES

CONSOLE = ("dashboard_page", "dashboard", "prometheus", "model", "validator_report", "validation_loss")


async def _stub(caller, req):  # never called: mount only registers
    return None


def _table() -> dict:
    apis = [object.__new__(cls) for cls in (HopApi, MergeApi, ShardApi)]  # bound methods need no state
    return route_handlers(*apis, {name: _stub for name in CONSOLE}, _stub)


def test_the_table_binds_every_route_and_nothing_else():
    assert set(_table()) == {r.name for r in ROUTES}


def test_each_api_route_is_handled_by_the_method_of_its_name():
    table = _table()
    api_routes = {r.name for r in ROUTES} - set(CONSOLE) - {"dataset_file"}
    misnamed = {name: table[name].__name__ for name in api_routes if table[name].__name__ != name}
    assert misnamed == {}


def test_mount_refuses_a_table_missing_a_route():
    table = _table()
    del table["lease"]
    with pytest.raises(ValueError, match=r"no handler for bridge routes \['lease'\]"):
        mount(FastAPI(), ROUTES, table, auth=None)


def test_mount_refuses_a_handler_for_a_route_that_does_not_exist():
    table = {**_table(), "leese": _stub}
    with pytest.raises(ValueError, match=r"handlers \['leese'\] name no route"):
        mount(FastAPI(), ROUTES, table, auth=None)


def test_the_client_has_a_typed_method_for_every_signed_route():
    from protocol.bridge_client import BridgeClient
    method = {"run": "run_info"}  # `run` would read as an action on a client
    signed = {r.name for r in ROUTES if r.role != "public"} | {"model"}
    assert sorted(n for n in signed if not callable(getattr(BridgeClient, method.get(n, n), None))) == []
