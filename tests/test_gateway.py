"""The gateway forwards the Fleet API and /health, and nothing else (Control stays off the site-facing address)."""

from __future__ import annotations

import httpx
import pytest
from starlette.testclient import TestClient

from server.gateway import create_gateway, is_allowed


class _Body(httpx.AsyncByteStream):
    """A streamed upstream body, as the SuperLink sends it (not pre-read like ``content=``)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    async def __aiter__(self):  # type: ignore[override]
        yield self._data


@pytest.fixture()
def upstream_calls() -> list[httpx.Request]:
    return []


@pytest.fixture()
def gateway(upstream_calls: list[httpx.Request]) -> TestClient:
    def handler(request: httpx.Request) -> httpx.Response:
        upstream_calls.append(request)
        return httpx.Response(200, stream=_Body(b"upstream:" + request.url.path.encode() + b":" + request.content), headers={"x-upstream": "1"})

    app = create_gateway("https://127.0.0.1:9093", None, transport=httpx.MockTransport(handler))
    return TestClient(app)


@pytest.mark.parametrize(
    "path",
    ["/v1/control/start-run", "/v1/control/register-node", "/v1/runtime/pull-messages", "/", "/docs", "/v1/fleetx", "/v1/fleet/../control/start-run", "/v1/fleet/%2e%2e/control/list-runs"],
)
def test_everything_but_fleet_and_health_is_refused(gateway: TestClient, upstream_calls: list, path: str) -> None:
    reply = gateway.post(path, content=b"payload")
    assert reply.status_code == 403
    assert "only the Fleet API" in reply.json()["detail"]
    assert upstream_calls == []  # the SuperLink never saw it


def test_fleet_calls_are_forwarded_intact(gateway: TestClient, upstream_calls: list) -> None:
    headers = {"content-type": "application/protobuf", "x-flwr-public-key": "abc", "x-flwr-signature": "sig"}
    reply = gateway.post("/v1/fleet/pull-messages", content=b"\x01\x02body", headers=headers)
    assert reply.status_code == 200
    assert reply.content == b"upstream:/v1/fleet/pull-messages:\x01\x02body"
    assert reply.headers["x-upstream"] == "1"
    (sent,) = upstream_calls
    assert sent.method == "POST" and str(sent.url) == "https://127.0.0.1:9093/v1/fleet/pull-messages"
    for key, value in headers.items():  # node-auth headers survive the hop
        assert sent.headers[key] == value


def test_health_is_forwarded(gateway: TestClient, upstream_calls: list) -> None:
    assert gateway.get("/health").status_code == 200
    assert [r.url.path for r in upstream_calls] == ["/health"]


def test_unreachable_superlink_is_a_502_not_a_crash() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    client = TestClient(create_gateway("https://127.0.0.1:9093", None, transport=httpx.MockTransport(down)))
    reply = client.post("/v1/fleet/pull-messages", content=b"x")
    assert reply.status_code == 502 and "not answering" in reply.json()["detail"]


def test_path_rule() -> None:
    assert is_allowed("/v1/fleet/push-messages") and is_allowed("/health")
    assert not is_allowed("/v1/control/list-runs") and not is_allowed("/healthz") and not is_allowed("/v1/fleet//x")
