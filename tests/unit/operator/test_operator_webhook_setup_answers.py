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

import jsonpatch
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

    do_GET = do_POST = do_PUT = do_PATCH = answer

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
    """A client of an API server answering each method (GET, POST, PUT, PATCH) with its
    (status, body), and the requests it got."""
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
    api, requests = api_server(
        {"GET": (200, answer), "POST": (201, b"{}"), "PUT": (200, b"{}"), "PATCH": (200, b"{}")}
    )
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
    api, requests = api_server({"GET": (200, answer), "PATCH": (200, b"{}")})
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
    api, requests = api_server({"GET": (200, VALIDATING), "PATCH": (200, answer)})
    fill(api)
    assert [json.loads(sent) for method, _, sent in requests if method == "PATCH"] == [
        filling(["/webhooks/0/clientConfig/caBundle"])
    ] * 2

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
    api, _ = api_server({"GET": (200, VALIDATING), "PATCH": (status, b"\xff[[[<html>")})
    with pytest.raises(AdmissionSetupError, match=f"cannot write .* {NAME}: HTTP {status} "):
        fill(api)


def filling(paths: list[str], resource_version: str = "7") -> list[dict[str, Any]]:
    """The JSON patch `fill_ca_bundle` sends to set BUNDLE at each of `paths`."""
    return [
        {"op": "replace", "path": "/metadata/resourceVersion", "value": resource_version},
        *({"op": "add", "path": path, "value": BUNDLE} for path in paths),
    ]


def filled_in(
    answer: dict[str, Any], api_server: Callable[[Answers], tuple[k8s.ApiClient, Requests]]
) -> list[tuple[str, str, bytes]]:
    """The PATCH requests `fill_ca_bundle` sends for both kinds with `answer` read back."""
    api, requests = api_server({"GET": (200, json.dumps(answer).encode()), "PATCH": (200, b"{}")})
    fill(api)
    assert [method for method, _, _ in requests] == ["GET", "PATCH", "GET", "PATCH"]
    return [request for request in requests if request[0] == "PATCH"]


FUTURE = {"futureField": {"nested": ["x", 1]}, "futureFlag": True}
"""Fields of a newer API server, which the kubernetes client's models refuse."""


@pytest.mark.parametrize(
    "where",
    [
        pytest.param("configuration", id="on-the-configuration"),
        pytest.param("webhook", id="on-a-webhook"),
        pytest.param("clientConfig", id="on-a-client-config"),
        pytest.param("metadata", id="in-metadata"),
    ],
)
def test_fields_the_client_does_not_know_are_kept_where_the_ca_bundle_is_filled_in(
    api_server: Callable[[Answers], tuple[k8s.ApiClient, Requests]], where: str
) -> None:
    """A newer API server's fields stopped start-up: the kubernetes client refused the
    configuration as read back (pydantic's "Extra inputs are not permitted"), and writing it
    whole through the typed client would have dropped them. Now only the caBundle is sent."""
    answer = json.loads(VALIDATING)
    hook = answer["webhooks"][0]
    target = {
        "configuration": answer,
        "webhook": hook,
        "clientConfig": hook["clientConfig"],
        "metadata": answer["metadata"],
    }[where]
    target.update(FUTURE)
    for _, path, sent in filled_in(answer, api_server):
        patch = json.loads(sent)
        assert patch == filling(["/webhooks/0/clientConfig/caBundle"])
        assert path.endswith(f"webhookconfigurations/{NAME}")
        # Applied to what the server has, it changes the caBundle and nothing else.
        expected = json.loads(json.dumps(answer))
        expected["webhooks"][0]["clientConfig"]["caBundle"] = BUNDLE
        assert jsonpatch.apply_patch(answer, patch) == expected


def test_the_ca_bundle_patch_is_sent_as_a_json_patch(
    api_server: Callable[[Answers], tuple[k8s.ApiClient, Requests]], server: _Server
) -> None:
    # A JSON patch names paths: a merge patch would replace the webhooks list whole, and a
    # strategic merge patch is decoded by the API server into its own (older or newer) types.
    seen: list[str | None] = []

    class Recording(_Handler):
        def answer(self) -> None:
            seen.append(self.headers.get("Content-Type"))
            super().answer()

        do_GET = do_PATCH = answer

    server.RequestHandlerClass = Recording
    try:
        filled_in(json.loads(VALIDATING), api_server)
    finally:
        server.RequestHandlerClass = _Handler
    assert seen[1] == seen[3] == "application/json-patch+json"


@pytest.mark.parametrize(
    ("webhook", "kept"),
    [
        pytest.param({"sideEffects": None}, "admissionReviewVersions", id="lacking-a-field"),
        pytest.param({"futureField": "x"}, "futureField", id="a-field-the-client-does-not-know"),
        pytest.param({f"future{i}": "x" for i in range(5)}, "future4", id="many"),
    ],
)
def test_a_configuration_read_back_the_client_would_refuse_to_send_is_filled_in(
    api_server: Callable[[Answers], tuple[k8s.ApiClient, Requests]],
    webhook: dict[str, Any],
    kept: str,
) -> None:
    """The kubernetes client checks a body against its model before sending it: these were
    an AdmissionSetupError ("the kubernetes client refuses it as read back") that stopped
    start-up. The patch sent holds none of the configuration read, so the client has nothing
    to refuse and the server keeps what it has."""
    answer = json.loads(VALIDATING)
    hook = answer["webhooks"][0]
    hook.update(webhook)
    for field, value in webhook.items():
        if value is None:
            del hook[field]
    for _, _, sent in filled_in(answer, api_server):
        patched = jsonpatch.apply_patch(answer, json.loads(sent))
        assert patched["webhooks"][0]["clientConfig"]["caBundle"] == BUNDLE
        assert patched["webhooks"][0][kept] == hook[kept]


def test_only_the_webhooks_lacking_the_ca_bundle_are_patched(
    api_server: Callable[[Answers], tuple[k8s.ApiClient, Requests]],
) -> None:
    answer = json.loads(VALIDATING)
    answer["webhooks"] = [
        {"name": "has-it", "clientConfig": {"caBundle": BUNDLE, "url": "https://a"}},
        {"name": "old-one", "clientConfig": {"caBundle": "b2xk", "service": {"name": "s"}}},
        {"name": "none", "clientConfig": {"url": "https://c", "futureField": 1}},
        {"name": "no-client-config", "futureField": 2},
    ]
    for _, _, sent in filled_in(answer, api_server):
        patch = json.loads(sent)
        assert patch == [
            *filling(["/webhooks/1/clientConfig/caBundle", "/webhooks/2/clientConfig/caBundle"]),
            {"op": "add", "path": "/webhooks/3/clientConfig", "value": {"caBundle": BUNDLE}},
        ]
        patched = jsonpatch.apply_patch(answer, patch)
        assert [h["clientConfig"]["caBundle"] for h in patched["webhooks"]] == [BUNDLE] * 4
        assert patched["webhooks"][2]["clientConfig"]["futureField"] == 1
        assert patched["webhooks"][3]["futureField"] == 2


@pytest.mark.parametrize(
    "webhooks",
    [
        pytest.param([{"clientConfig": {"caBundle": BUNDLE}, "futureField": 1}], id="filled"),
        pytest.param([], id="no-webhooks"),
        pytest.param(None, id="webhooks-null"),
    ],
)
def test_a_configuration_with_nothing_to_fill_in_is_not_written(
    api_server: Callable[[Answers], tuple[k8s.ApiClient, Requests]], webhooks: Any
) -> None:
    api, requests = api_server(
        {"GET": (200, configuration(webhooks=webhooks)), "PATCH": (500, b"{}")}
    )
    fill(api)
    assert [method for method, _, _ in requests] == ["GET", "GET"]


def test_a_configuration_read_back_in_good_shape_is_filled_in_and_the_rest_left_as_read(
    api_server: Callable[[Answers], tuple[k8s.ApiClient, Requests]],
) -> None:
    # The patch, applied to what was read, is what was read but for its caBundle: fields the
    # operator itself does not use among it. It carries the resourceVersion read, so the API
    # server refuses it (409 Conflict) if the configuration changed since.
    answer = json.loads(VALIDATING)
    answer["metadata"]["labels"] = {"team": "a"}
    answer["metadata"]["resourceVersion"] = "12345"
    answer["webhooks"][0].update(timeoutSeconds=3, matchPolicy="Exact")
    first_patch = json.loads(filled_in(answer, api_server)[0][2])
    assert first_patch[0] == {
        "op": "replace",
        "path": "/metadata/resourceVersion",
        "value": "12345",
    }
    expected = json.loads(json.dumps(answer))
    expected["webhooks"][0]["clientConfig"]["caBundle"] = BUNDLE
    assert jsonpatch.apply_patch(answer, first_patch) == expected
