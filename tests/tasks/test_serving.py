"""Managed `mlflow models serve` processes over real HTTP (a trivial pyfunc model)."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
from prefect.logging import disable_run_logger

from slmops.config import ModelServerSpec, WrapperKind
from tasks.serving import ask, serve_model, status_of, stop_server
from tests.support.echo_versions import register

pytestmark = pytest.mark.e2e


def serve(store, uri, servers_dir):
    with disable_run_logger():
        spec = ModelServerSpec(
            model_uri=uri, name="echo", kind=WrapperKind.PROMPT_ONNX, smoke_question="hello",
            startup_timeout_s=120.0,
        )  # fmt: skip
        return serve_model.fn(spec, servers_dir, store)


def test_serve_switch_status_and_stop(fresh_store, tmp_path):
    servers = tmp_path / "servers"
    v1 = register(fresh_store, "echo")
    first = serve(fresh_store, v1.uri, servers)
    assert first.answer.startswith("echo: ") and "hello" in first.answer
    assert first.handle.host == "127.0.0.1"
    assert status_of(servers, "echo").state == "serving"

    assert (first.handle.version, first.handle.alias) == ("1", "")

    # Same model again: the healthy server is reused, not restarted. Asked for by an alias
    # that names the same version, the state file records the alias (what metrics label).
    fresh_store.client().set_registered_model_alias("echo", "champion", "1")
    again = serve(fresh_store, "models:/echo@champion", servers)
    assert again.reused and again.handle.pid == first.handle.pid
    assert status_of(servers, "echo").handle.alias == "champion"

    # A new version: started beside the old one, checked, switched, then the old one stopped.
    v2 = register(fresh_store, "echo")
    second = serve(fresh_store, v2.uri, servers)
    assert second.replaced == again.handle and second.handle.port != first.handle.port
    assert (second.handle.version, second.handle.alias) == ("2", "")
    assert status_of(servers, "echo").handle.model_uri == v2.uri
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{first.handle.url}/ping", timeout=2)
    assert "hello" in ask(second.handle, "hello")

    stopped = stop_server(servers, "echo")
    assert stopped.detail == "stopped" and status_of(servers, "echo").state == "absent"


def test_a_crashed_server_is_seen_by_status_and_repaired_by_serve(fresh_store, tmp_path):
    servers = tmp_path / "servers"
    v1 = register(fresh_store, "echo")
    first = serve(fresh_store, v1.uri, servers)
    os.killpg(first.handle.pid, signal.SIGKILL)
    for _ in range(50):
        if status_of(servers, "echo").state == "dead":
            break
        time.sleep(0.1)
    assert status_of(servers, "echo").state == "dead"
    repaired = serve(fresh_store, v1.uri, servers)
    assert not repaired.reused and status_of(servers, "echo").state == "serving"
    stop_server(servers, "echo")


def test_a_model_that_cannot_serve_leaves_the_old_server(fresh_store, tmp_path):
    servers = tmp_path / "servers"
    v1 = register(fresh_store, "echo")
    first = serve(fresh_store, v1.uri, servers)
    # Found missing before a server is started (the memory check sizes the model first).
    with pytest.raises(Exception, match="cannot serve models:/echo/99.*not found"):
        serve(fresh_store, "models:/echo/99", servers)
    assert status_of(servers, "echo").handle == first.handle
    assert status_of(servers, "echo").state == "serving"
    stop_server(servers, "echo")


def test_stop_flow_stops_servers_of_kinds_it_was_not_asked_about(
    tmp_path, monkeypatch, prefect_harness
):
    from flows.serve import serve as serve_flow
    from slmops.config import ServeFlowConfig, ServeSpec
    from tasks.serving import ServerHandle, served_names, state_path

    monkeypatch.setenv("SLMOPS_HOME", str(tmp_path))
    servers = tmp_path / "servers"
    servers.mkdir()
    stale = ServerHandle(
        name="custom-model", kind=WrapperKind.CHAT_ONNX, model_uri="models:/custom-model/1", host="127.0.0.1",
        port=1, pid=2**22 + 1, process_started=0.0, log_path=servers / "x.log", started_at="then",
    )  # fmt: skip
    state_path(servers, "custom-model").write_text(stale.model_dump_json())
    rows = serve_flow(ServeFlowConfig(action="stop", serve=ServeSpec(kinds=(), front_door=False)))
    assert [r["name"] for r in rows] == ["custom-model"] and served_names(servers) == []
