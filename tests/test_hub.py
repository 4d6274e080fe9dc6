import socket

import pytest

from wisparse.hub import hub_reachable


@pytest.fixture(autouse=True)
def _fresh_answer():
    hub_reachable.cache_clear()
    yield
    hub_reachable.cache_clear()


def test_offline_flag_means_unreachable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not hub_reachable()


def test_endpoint_that_answers_is_reachable_and_one_that_does_not_is_not(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert hub_reachable()
    hub_reachable.cache_clear()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")  # closed now: connection refused
    assert not hub_reachable(timeout_s=1.0)
