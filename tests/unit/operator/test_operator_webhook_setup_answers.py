"""Writing the webhook configurations (`register`) and filling in their caBundle
(`fill_ca_bundle`) against an API server answering what no API server should: each bad answer
is an AdmissionSetupError naming the configuration, never another error out of start-up. The
API server is a local HTTP server; the kubernetes client and urllib3 are the real ones."""

from __future__ import annotations

import base64
import http.server
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client as k8s

from defender_operator._errors import AdmissionSetupError
from defender_operator._settings import OperatorSettings
from defender_operator._webhook_setup import fill_ca_bundle, register

NAME = "ml-defender"
CA = b"-----BEGIN CERTIFICATE-----\nnot checked here\n-----END CERTIFICATE-----\n"
BUNDLE = base64.b64encode(CA).decode()
BROKEN_OFF = b"<a body cut short>"
"""As an answer: the headers promise more than is sent before the connection closes."""

Answers = dict[str, tuple[int, bytes]]
Requests = list[tuple[str, str, bytes]]


def configuration(**fields: Any) -> bytes:
    body = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": NAME, "resourceVersion": "7"},
        "webhooks": [
            {
                "name": "a.example",
                "clientConfig": {"caBundle": "b2xk", "url": "https://a.example/validate"},
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
            }
        ],
        **fields,
    }
    return json.dumps(body).encode()


VALIDATING = configuration()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Answers each method with `server.answers[method]`, recording the request."""

    server: _Server

    def answer(self) -> None:
        sent = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append((self.command, self.path, sent))
        status, body = self.server.answers[self.command]
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        promised = len(body) + (1000 if body == BROKEN_OFF else 0)
        self.send_header("Content-Length", str(promised))
        self.end_headers()
        self.wfile.write(body)  # HTTP/1.0: the connection closes after this

    do_GET = do_POST = do_PUT = answer

    def log_message(self, *_: Any) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    answers: Answers
    requests: Requests


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    # One for the module: stopping a server waits out its 0.5 s poll.
    found = _Server(("127.0.0.1", 0), _Handler)
    threading.Thread(target=found.serve_forever, daemon=True).start()
    yield found
    found.shutdown()
    found.server_close()


@pytest.fixture
def api_server(server: _Server) -> Iterator[Callable[[Answers], tuple[k8s.ApiClient, Requests]]]:
    """A client of an API server answering each method (GET, POST, PUT) with its (status,
    body), and the requests it got."""
    clients: list[k8s.ApiClient] = []

    def start(answers: Answers) -> tuple[k8s.ApiClient, Requests]:
        server.answers, server.requests = answers, []
        host = f"http://127.0.0.1:{server.server_address[1]}"
        api = k8s.ApiClient(k8s.Configuration(host=host))
        clients.append(api)
        return api, server.requests

    yield start
    for api in clients:
        api.close()


def settings() -> OperatorSettings:
    return OperatorSettings(admission_url="https://127.0.0.1:9443", admission_configuration=NAME)


def fill(api: k8s.ApiClient) -> None:
    fill_ca_bundle(api, NAME, CA)


def register_both(api: k8s.ApiClient) -> None:
    register(api, settings(), CA, ["default"])


SETUPS = [pytest.param(fill, id="fill_ca_bundle"), pytest.param(register_both, id="register")]


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize(
    ("answer", "says"),
    [
        pytest.param(b"<html>502 Bad Gateway</html>", "is not JSON", id="not-json"),
        pytest.param(b"", "is not JSON", id="empty"),
        pytest.param(b"\xff\xfe\x00{", "is not JSON", id="not-utf8"),
        pytest.param(b'"a string"', "is JSON str, not an object", id="a-string"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, "is not JSON", id="nested-100k"),
        pytest.param(
            b'{"metadata": {"resourceVersion": "1"}, "pad": "'
            + b"x" * 5_000_000
            + b'", "webhooks": '
            + b'{"a":' * 5_000
            + b"1"
            + b"}" * 5_000
            + b"}",
            "is not JSON",
            id="big-and-nested-5k",
        ),
        pytest.param(BROKEN_OFF, "answer broke off (ProtocolError)", id="broken-off"),
        pytest.param(
            configuration(metadata=None),
            "has no metadata.resourceVersion string",
            id="no-metadata",
        ),
        pytest.param(
            configuration(metadata=["a list"]),
            "has no metadata.resourceVersion string",
            id="metadata-a-list",
        ),
        pytest.param(
            configuration(metadata={"name": NAME}),
            "has no metadata.resourceVersion string",
            id="no-resource-version",
        ),
        pytest.param(
            configuration(metadata={"name": NAME, "resourceVersion": 7}),
            "has no metadata.resourceVersion string",
            id="resource-version-a-number",
        ),
    ],
)
def test_a_configuration_read_back_that_cannot_be_used_is_an_admission_setup_error(
    api_server: Callable[[Answers], tuple[k8s.ApiClient, Requests]],
    setup: Callable[[k8s.ApiClient], None],
    answer: bytes,
    says: str,
) -> None:
    api, requests = api_server({"GET": (200, answer), "POST": (201, b"{}"), "PUT": (200, b"{}")})
    with pytest.raises(AdmissionSetupError) as info:
        setup(api)
    message = str(info.value)
    assert message.startswith(f"cannot read ValidatingWebhookConfiguration {NAME}: ")
    assert says in message
    assert len(message) < 300  # names the fault; quotes none of the answer
    assert [method for method, _, _ in requests] == ["GET"]  # nothing written on a bad read


BAD_WEBHOOKS = [
    pytest.param({"a": {}}, "webhooks that are not a list of objects", id="webhooks-an-object"),
    pytest.param("abc", "webhooks that are not a list of objects", id="webhooks-a-string"),
    pytest.param(
        [{}, "a webhook"], "webhooks that are not a list of objects", id="a-webhook-a-string"
    ),
    pytest.param(
        [{"clientConfig": None}],
        "a webhook whose clientConfig is not an object",
        id="client-config-null",
    ),
    pytest.param(
        [{"clientConfig": "x"}],
        "a webhook whose clientConfig is not an object",
        id="client-config-a-string",
    ),
]


@pytest.mark.parametrize(("webhooks", "says"), BAD_WEBHOOKS)
def test_webhooks_read_back_that_cannot_take_a_ca_bundle_are_an_admission_setup_error(
    api_server: Callable[[Answers], tuple[k8s.ApiClient, Requests]], webhooks: Any, says: str
) -> None:
    answer = configuration(webhooks=webhooks)
    api, requests = api_server({"GET": (200, answer), "PUT": (200, b"{}")})
    with pytest.raises(AdmissionSetupError) as info:
        fill(api)
    assert str(info.value) == (
        f"cannot fill in the caBundle of ValidatingWebhookConfiguration {NAME}: the API"
        f" server's answer has {says}"
    )
    assert [method for method, _, _ in requests] == ["GET"]


@pytest.mark.parametrize(("webhooks", "_"), BAD_WEBHOOKS)
def test_register_writes_over_webhooks_read_back_in_any_shape(
    api_server: Callable[[Answers], tuple[k8s.ApiClient, Requests]], webhooks: Any, _: str
) -> None:
    # Only the resourceVersion of what is there is used: the operator's own replaces it.
    answer = configuration(webhooks=webhooks)
    api, requests = api_server({"GET": (200, answer), "PUT": (200, b"{}")})
    register_both(api)
    puts = [json.loads(sent) for method, _, sent in requests if method == "PUT"]
    assert [p["metadata"]["resourceVersion"] for p in puts] == ["7", "7"]
    assert all(p["webhooks"][0]["clientConfig"]["caBundle"] == BUNDLE for p in puts)


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("status", [403, 500])
def test_a_failed_read_with_a_body_of_any_kind_is_an_admission_setup_error(
    api_server: Callable[[Answers], tuple[k8s.ApiClient, Requests]],
    setup: Callable[[k8s.ApiClient], None],
    status: int,
) -> None:
    api, _ = api_server({"GET": (status, b"[" * 100_000 + b"<html>")})
    with pytest.raises(AdmissionSetupError, match=f"cannot read .* {NAME}: HTTP {status} "):
        setup(api)


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"<html>ok</html>", id="not-json"),
        pytest.param(b"[1]", id="a-list"),
        pytest.param(b'{"webhooks": 5, "metadata": []}', id="another-shape"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="nested-100k"),
        pytest.param(BROKEN_OFF, id="broken-off"),
    ],
)
def test_a_write_the_api_server_accepted_counts_whatever_its_answer_says(
    api_server: Callable[[Answers], tuple[k8s.ApiClient, Requests]], answer: bytes
) -> None:
    """Nothing in the answer to a write is used: its 2xx status is the acceptance. The typed
    model's decoding raised JSONDecodeError, TypeError, pydantic's ValidationError or
    RecursionError out of start-up on these."""
    api, requests = api_server({"GET": (200, VALIDATING), "PUT": (200, answer)})
    fill(api)
    puts = [json.loads(sent) for method, _, sent in requests if method == "PUT"]
    assert [p["webhooks"][0]["clientConfig"]["caBundle"] for p in puts] == [BUNDLE, BUNDLE]
    assert {p["metadata"]["resourceVersion"] for p in puts} == {"7"}

    api, requests = api_server({"GET": (404, b"not found"), "POST": (201, answer)})
    register_both(api)
    assert [json.loads(sent)["kind"] for method, _, sent in requests if method == "POST"] == [
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
    ]


@pytest.mark.parametrize("status", [409, 422])
def test_a_refused_write_with_a_body_of_any_kind_is_an_admission_setup_error(
    api_server: Callable[[Answers], tuple[k8s.ApiClient, Requests]], status: int
) -> None:
    api, _ = api_server({"GET": (200, VALIDATING), "PUT": (status, b"\xff[[[<html>")})
    with pytest.raises(AdmissionSetupError, match=f"cannot write .* {NAME}: HTTP {status} "):
        fill(api)


@pytest.mark.parametrize(
    ("webhook", "says"),
    [
        pytest.param(
            {"sideEffects": None}, "webhooks.0.sideEffects: Field required", id="lacking-a-field"
        ),
        pytest.param(
            {"futureField": "x"},
            "webhooks.0.futureField: Extra inputs are not permitted",
            id="a-field-the-client-does-not-know",
        ),
        pytest.param(
            {f"future{i}": "x" for i in range(5)},
            "webhooks.0.future2: Extra inputs are not permitted; 2 more",
            id="many",
        ),
    ],
)
def test_a_configuration_read_back_the_client_refuses_to_send_is_an_admission_setup_error(
    api_server: Callable[[Answers], tuple[k8s.ApiClient, Requests]],
    webhook: dict[str, Any],
    says: str,
) -> None:
    """The kubernetes client checks a body against its model before sending it, and raised
    pydantic's ValidationError out of start-up."""
    answer = json.loads(VALIDATING)
    hook = answer["webhooks"][0]
    hook.update(webhook)
    for field, value in webhook.items():
        if value is None:
            del hook[field]
    api, requests = api_server({"GET": (200, json.dumps(answer).encode()), "PUT": (200, b"{}")})
    with pytest.raises(AdmissionSetupError) as info:
        fill(api)
    message = str(info.value)
    assert message.startswith(
        f"cannot write ValidatingWebhookConfiguration {NAME}: the kubernetes client refuses"
    )
    assert says in message
    assert "'x'" not in message and "input_value" not in message  # no values
    assert [method for method, _, _ in requests] == ["GET"]


def test_a_configuration_read_back_in_good_shape_is_filled_in_and_written_back_whole(
    api_server: Callable[[Answers], tuple[k8s.ApiClient, Requests]],
) -> None:
    # What the checks let through is written back as read but for its caBundle, fields the
    # operator itself does not use among it.
    answer = json.loads(VALIDATING)
    answer["metadata"]["labels"] = {"team": "a"}
    answer["webhooks"][0].update(timeoutSeconds=3, matchPolicy="Exact")
    api, requests = api_server({"GET": (200, json.dumps(answer).encode()), "PUT": (200, b"{}")})
    fill(api)
    first_put = next(json.loads(sent) for method, _, sent in requests if method == "PUT")
    answer["webhooks"][0]["clientConfig"]["caBundle"] = BUNDLE
    assert first_put == answer
