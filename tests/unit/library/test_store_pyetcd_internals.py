"""The store layer (`_store/_pyetcd.py` and its siblings) subclasses and reaches into private
parts of etcd-sdk-python (`pyetcd`), pinned to one exact version in pyproject.toml. One test
per private member it touches, checked against the installed package without a server: an
upgrade that renames or reshapes any of them fails here, loudly, before anything talks to etcd.
(docs/library.md, "Why etcd-sdk-python, pinned".)"""

from __future__ import annotations

import importlib
import inspect
import queue
import re
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
import pyetcd
import pytest
from pyetcd import etcdrpc
from pyetcd import events as etcd_events
from pyetcd import exceptions as etcd_exc
from pyetcd import transactions as etcd_txn
from pyetcd import utils as etcd_utils
from pyetcd import watch as etcd_watch
from pyetcd.etcdrpc import kv_pb2

from defender_config._store import _pyetcd
from defender_config._store._pyetcd import _event, _SharedClient, _to_compare, _to_op
from defender_config._store_types import Compare, DeleteOp, GetOp, PutOp

REPO = Path(__file__).resolve().parents[3]
BASE = pyetcd.MultiEndpointEtcd3Client


def _pinned() -> str:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (spec,) = [d for d in project["dependencies"] if d.startswith("etcd-sdk-python")]
    match = re.fullmatch(r"etcd-sdk-python==(\S+)", spec.replace(" ", ""))
    assert match, f"etcd-sdk-python must be pinned to one version (==), found {spec!r}"
    return match.group(1)


def test_the_client_is_pinned_to_the_installed_version_everywhere() -> None:
    pinned = _pinned()
    assert metadata.version("etcd-sdk-python") == pinned
    constraints = (REPO / "requirements" / "constraints.txt").read_text()
    assert f"etcd-sdk-python=={pinned}" in constraints.splitlines()


def _client_module() -> Any:
    # `pyetcd.client` is shadowed by the package's `client()` function.
    return importlib.import_module("pyetcd.client")


def _endpoint(port: int) -> Any:
    # gRPC channels connect lazily: nothing listens there and nothing is dialled.
    return pyetcd.Endpoint("127.0.0.1", port, secure=False, time_retry=2.0)


@pytest.fixture
def client() -> Iterator[Any]:
    c = _SharedClient(
        endpoints=[_endpoint(1), _endpoint(2)], timeout=1.0, failover=True, on_failover=lambda: None
    )
    yield c
    c.close()


def _params(fn: Any) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_base_init_takes_endpoints_timeout_and_failover() -> None:
    assert _params(BASE.__init__)[:5] == ["self", "endpoints", "timeout", "user", "password"]
    assert "failover" in _params(BASE.__init__)


def test_current_endpoint_label_is_a_property_whose_setter_drops_the_stubs(client: Any) -> None:
    prop = inspect.getattr_static(BASE, "_current_endpoint_label")
    assert isinstance(prop, property) and prop.fset is not None
    client._stubs["kvstub"] = object()
    other = next(lbl for lbl in client.endpoints if lbl != client._current_endpoint_label)
    client._current_endpoint_label = other
    assert client._stubs == {}


def test_stubs_are_cached_in_a_dict_named__stubs(client: Any) -> None:
    assert client._stubs == {}
    stub = client.kvstub
    assert client._stubs["kvstub"] is stub


def test_clear_old_stubs_empties_the_cache(client: Any) -> None:
    assert _params(BASE._clear_old_stubs) == ["self"]
    client._stubs["leasestub"] = object()
    client._clear_old_stubs()
    assert client._stubs == {}


def test_manage_grpc_errors_is_the_base_hook_we_override() -> None:
    assert _params(BASE._manage_grpc_errors) == ["self", "exc"]
    assert _SharedClient._manage_grpc_errors is not BASE._manage_grpc_errors
    # pyetcd's own calls go through the hook, so the override sees their failures too.
    assert "self._manage_grpc_errors(exc)" in inspect.getsource(_client_module())


def test_ops_to_requests_turns_transaction_ops_into_request_ops(client: Any) -> None:
    ops = [_to_op(PutOp("/k", b"v")), _to_op(GetOp("/k")), _to_op(DeleteOp("/p/", prefix=True))]
    requests = client._ops_to_requests(ops)
    assert [r.WhichOneof("request") for r in requests] == [
        "request_put",
        "request_range",
        "request_delete_range",
    ]


def test_endpoints_map_labels_to_endpoints_with_fail_use_and_last_failed(client: Any) -> None:
    assert set(client.endpoints) == {"127.0.0.1:1", "127.0.0.1:2"}
    ep = client.endpoints["127.0.0.1:1"]
    ep.fail()
    assert ep.is_failed() and ep.last_failed > 0
    ep.last_failed = 0
    assert not ep.is_failed()
    assert ep.use() is ep.channel


def test_endpoint_takes_our_options() -> None:
    assert _params(pyetcd.Endpoint.__init__) == [
        "self",
        "host",
        "port",
        "secure",
        "creds",
        "time_retry",
        "opts",
    ]


def test_timeout_credentials_and_metadata_are_plain_attributes(client: Any) -> None:
    assert client.timeout == 1.0
    assert client.call_credentials is None
    assert client.metadata is None


def test_the_stub_properties_we_lock_are_the_base_ones() -> None:
    for name in ("kvstub", "leasestub", "clusterstub", "maintenancestub", "authstub"):
        assert isinstance(inspect.getattr_static(BASE, name), property), name
        assert isinstance(inspect.getattr_static(_SharedClient, name), property), name
    assert isinstance(inspect.getattr_static(BASE, "watcher"), property)
    assert isinstance(inspect.getattr_static(BASE, "channel"), property)


def test_get_watcher_builds_a_watcher_with_add_callback_and_cancel(client: Any) -> None:
    assert _params(BASE.get_watcher) == ["self"]
    assert _params(etcd_watch.Watcher.add_callback)[:3] == ["self", "key", "callback"]
    assert {"range_end", "start_revision", "prev_kv"} <= set(
        _params(etcd_watch.Watcher.add_callback)
    )
    assert _params(etcd_watch.Watcher.cancel) == ["self", "watch_id"]
    assert isinstance(client.get_watcher(), etcd_watch.Watcher)
    assert isinstance(client.watcher, _pyetcd._Watcher)


def test_the_watcher_privates_our_add_callback_works_with() -> None:
    # _Watcher.add_callback replaces pyetcd's: same lock, condition, pending-creation slot,
    # stream thread and request queue, read by pyetcd's _run and _handle_response.
    watcher = etcd_watch.Watcher(etcdrpc.WatchStub(grpc.insecure_channel("127.0.0.1:1")), 1.0)
    assert watcher._new_watch_cond._lock is watcher._lock
    assert watcher._new_watch is None and watcher._stopping is False
    assert watcher._callback_thread is None and watcher._request_queue.empty()
    assert callable(watcher._run) and callable(watcher._handle_response)
    assert _params(etcd_watch.Watcher._create_watch_request)[:2] == ["self", "key"]
    assert {"range_end", "start_revision", "progress_notify", "filters", "prev_kv"} <= set(
        _params(etcd_watch.Watcher._create_watch_request)
    )
    new_watch = etcd_watch._NewWatch(print)
    assert (new_watch.callback, new_watch.id, new_watch.err) == (print, None, None)
    assert _params(etcd_watch.Watcher.close) == ["self"]
    assert "timeout" in _params(etcd_watch.Watcher.__init__)


def test_the_watcher_opens_its_stream_on__watch_stub_and_the_call_can_be_cancelled() -> None:
    # _Watcher hands pyetcd a stub (`_CallKeepingStub`) that keeps the call `_run` opens, to
    # cancel it on close: pyetcd's close only half-closes, and etcd keeps such a stream.
    assert _params(etcd_watch.Watcher.__init__)[:2] == ["self", "watchstub"]
    stub = etcdrpc.WatchStub(grpc.insecure_channel("127.0.0.1:1"))
    watcher = etcd_watch.Watcher(stub, 1.0)
    assert watcher._watch_stub is stub
    assert "self._watch_stub.Watch(" in inspect.getsource(etcd_watch.Watcher._run)
    assert isinstance(watcher._request_queue, queue.Queue)
    call = stub.Watch(iter(()))  # the object _run iterates
    assert callable(call.cancel)
    call.cancel()
    ours = _pyetcd._Watcher(stub, endpoint="127.0.0.1:1", timeout=1.0)
    assert isinstance(ours._watch_stub, _pyetcd._CallKeepingStub)


def test_events_keep_the_protobuf_event_in__event() -> None:
    raw = kv_pb2.Event(
        type=kv_pb2.Event.PUT,
        kv=kv_pb2.KeyValue(key=b"/k", value=b"v", mod_revision=7, version=2, lease=0),
    )
    wrapped = etcd_events.new_event(raw)
    assert wrapped._event is raw
    got = _event(wrapped)
    assert (got.kind, got.key, got.value, got.mod_revision) == ("put", "/k", b"v", 7)
    deleted = etcd_events.new_event(kv_pb2.Event(type=kv_pb2.Event.DELETE, kv=raw.kv))
    assert isinstance(deleted, etcd_events.DeleteEvent) and _event(deleted).kind == "delete"


def test_compares_carry_op_and_value_and_build_their_message() -> None:
    for target, cls in (
        ("version", etcd_txn.Version),
        ("mod", etcd_txn.Mod),
        ("create", etcd_txn.Create),
    ):
        compare = _to_compare(Compare("/k", target, ">", 3))  # type: ignore[arg-type]
        assert isinstance(compare, cls)
        message = compare.build_message()
        assert message.result == etcdrpc.Compare.GREATER and message.key == b"/k"
    value = _to_compare(Compare("/k", "value", "==", b"x")).build_message()
    assert value.value == b"x" and value.result == etcdrpc.Compare.EQUAL


def test_prefix_range_end_is_the_next_key() -> None:
    assert etcd_utils.prefix_range_end(b"/a/") == b"/a0"


def test_the_exceptions_the_error_table_names_exist() -> None:
    for name in (
        "ConnectionFailedError",
        "ConnectionTimeoutError",
        "NoServerAvailableError",
        "WatchTimedOut",
        "InternalServerError",
        "PreconditionFailedError",
        "RevisionCompactedError",
    ):
        assert issubclass(getattr(etcd_exc, name), Exception), name
    # The table of which codes fail an endpoint mirrors pyetcd's own.
    etcd_client = _client_module()
    assert frozenset(etcd_client._FAILED_EP_CODES) == _pyetcd._ENDPOINT_FAILURE_CODES
    assert set(etcd_client._EXCEPTIONS_BY_CODE) == set(_pyetcd._PYETCD_EXCEPTIONS)


def test_grpc_status_codes_we_map_exist() -> None:
    assert {c.name for c in _pyetcd._ENDPOINT_FAILURE_CODES} <= {c.name for c in grpc.StatusCode}
