"""Admission decisions without a cluster: what is refused, the stamp, the configurations,
the self-signed certificate."""

from __future__ import annotations

import base64
import copy
import ipaddress
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from kubernetes import client as k8s

from defender_operator._admission_review import refusal, review
from defender_operator._decisions.attribution import (
    SEAL_ANNOTATION,
    STAMP_ANNOTATION,
    seal,
    stamp_changes,
    verified_author,
)
from defender_operator._errors import AdmissionSetupError, OperatorConfigurationError
from defender_operator._settings import load_operator_settings
from defender_operator._webhook_setup import (
    STAMP_ID,
    VALIDATE_ID,
    _Configs,
    webhook_configurations,
)
from defender_operator._webhook_tls import (
    CA,
    CERT,
    KEY,
    _from_dir,
    needs_new_cert,
    self_signed,
)

SAMPLE = Path(__file__).resolve().parents[3] / "manifests" / "samples" / "ml-detector.yaml"
KEY_BYTES = b"k" * 32
NOW = datetime(2026, 12, 1, tzinfo=UTC)


def spec(**config_changes: Any) -> dict[str, Any]:
    s = dict(yaml.safe_load(SAMPLE.read_text())["spec"])
    s["config"] = {**s["config"], **config_changes}
    return s


# --- what the validating webhook refuses ------------------------------------------------------


def test_a_valid_spec_has_no_problems() -> None:
    assert review("d", spec(), None, {}) == []


def test_config_problems_are_listed_by_field_path_under_spec_config() -> None:
    problems = review("d", spec(version="one point oh", colour="red"), None, {})
    assert len(problems) == 2
    assert problems[0].startswith("spec.config.version: String should match pattern")
    assert problems[1] == "spec.config.colour: Extra inputs are not permitted"


def test_a_refusal_of_thousands_of_problems_lists_a_few() -> None:
    problems = [f"spec.config.ports.{i}: too large" for i in range(5000)]
    message = refusal("fw", problems)
    assert message.startswith("fw refused (5000 problems): spec.config.ports.0: too large;")
    assert message.endswith("; and 4980 more") and len(message) < 4000


def test_spec_problems_are_listed_by_their_camel_case_path() -> None:
    bad = spec()
    bad["heartbeat"] = {"intervalSeconds": 0}
    assert review("d", bad, None, {}) == [
        "spec.heartbeat.intervalSeconds: Input should be greater than or equal to 1"
    ]


def test_a_custom_component_without_its_schema_is_refused_with_the_reason() -> None:
    bad = {"componentType": "custom", "config": {}, "selector": {"matchLabels": {"a": "b"}}}
    assert review("c", bad, None, {}) == ["spec: componentType custom needs customSchema"]


def test_a_custom_schema_whose_ref_leads_nowhere_is_refused_not_a_crash() -> None:
    dangling = {"type": "object", "properties": {"rate": {"$ref": "#/$defs/missing"}}}
    custom = {**spec(), "componentType": "custom", "config": {"rate": 1}, "customSchema": dangling}
    assert review("c", custom, None, {}) == [
        "spec.config.(schema): $ref '#/$defs/missing' points at nothing in the schema"
    ]


def test_a_rollback_command_that_names_no_version_is_refused() -> None:
    problems = review("d", spec(), None, {"mldefender.io/rollback-to": "yesterday"})
    assert len(problems) == 1
    assert problems[0].startswith("metadata.annotations[mldefender.io/rollback-to]: ")
    assert "'yesterday' is not valid: use `master` or a version number" in problems[0]
    assert review("d", spec(), None, {"mldefender.io/rollback-to": "master"}) == []
    assert review("d", spec(), None, {"mldefender.io/rollback-to": " 3 "}) == []
    # One grammar with the reconcile (the contract's): an empty target names nothing, nor
    # does a number past the layout's 10 digits or past the 4300 digits int() reads.
    for target in ["", "10000000000", "9" * 5000]:
        assert len(review("d", spec(), None, {"mldefender.io/rollback-to": target})) == 1


def test_a_refused_rollback_target_is_said_whole_with_the_versions_to_use() -> None:
    # On `make up` kubectl printed "... a version number from 1 to 9999999999 (`kubectl
    # defender h…": the listing's cut took the hint.
    for target in ("foo", "x" * 5000):
        problems = review("d", spec(), None, {"mldefender.io/rollback-to": target})
        message = refusal("d", problems)
        assert "…" not in message
        assert message.endswith("(`kubectl defender history <component>` lists the kept versions)")


def test_an_update_that_leaves_the_spec_alone_passes_even_an_invalid_stored_spec() -> None:
    # Stored while the webhook was down: the operator's finalizer and annotation writes must
    # still go through.
    stored = spec(colour="red")
    assert review("d", stored, copy.deepcopy(stored), {}) == []
    assert review("d", spec(colour="blue"), stored, {}) != []


def test_the_refusal_message_counts_and_joins_the_problems() -> None:
    assert refusal("d", ["a: x"]) == "d refused (1 problem): a: x"
    assert refusal("d", ["a: x", "b: y"]) == "d refused (2 problems): a: x; b: y"


# --- the stamp ------------------------------------------------------------------------------


def changes(**kw: Any) -> dict[str, str | None]:
    args: dict[str, Any] = {
        "key": KEY_BYTES,
        "namespace": "ns",
        "name": "d",
        "user": "alice",
        "config_digest": "c2",
        "old_config_digest": "c1",
        "annotations": {},
        "old_annotations": {},
    }
    args.update(kw)
    return stamp_changes(**args)


def test_a_new_config_is_stamped_with_the_requesting_user_and_sealed() -> None:
    got = changes()
    assert got[STAMP_ANNOTATION] == "alice"
    assert got[SEAL_ANNOTATION] == seal(KEY_BYTES, "ns", "d", "alice", "c2")
    assert changes(old_config_digest=None)[STAMP_ANNOTATION] == "alice"  # create


def test_a_stamp_the_client_wrote_is_overwritten_when_the_config_changes() -> None:
    forged = {STAMP_ANNOTATION: "admin", SEAL_ANNOTATION: "v1:00"}
    got = changes(annotations=forged)
    assert got[STAMP_ANNOTATION] == "alice" and got[SEAL_ANNOTATION] != "v1:00"


def test_without_a_config_change_the_stored_stamp_is_put_back() -> None:
    stored = {STAMP_ANNOTATION: "bob", SEAL_ANNOTATION: "v1:ab"}
    edited = {STAMP_ANNOTATION: "mallory"}
    assert changes(config_digest="c1", annotations=edited, old_annotations=stored) == {
        STAMP_ANNOTATION: "bob",
        SEAL_ANNOTATION: "v1:ab",
    }
    # Nothing stored, something added: removed again.
    assert changes(config_digest="c1", annotations=edited) == {STAMP_ANNOTATION: None}
    # Already right: no patch at all.
    assert changes(config_digest="c1", annotations=stored, old_annotations=stored) == {}


def test_a_seal_verifies_for_its_object_and_config_only() -> None:
    good = {STAMP_ANNOTATION: "alice", SEAL_ANNOTATION: seal(KEY_BYTES, "ns", "d", "alice", "c")}
    assert verified_author(KEY_BYTES, "ns", "d", good, "c") == "alice"
    assert verified_author(KEY_BYTES, "ns", "d", good, "other-config") is None
    assert verified_author(KEY_BYTES, "ns", "other", good, "c") is None
    assert verified_author(KEY_BYTES, "other", "d", good, "c") is None
    assert verified_author(b"x" * 32, "ns", "d", good, "c") is None
    renamed = {**good, STAMP_ANNOTATION: "admin"}
    assert verified_author(KEY_BYTES, "ns", "d", renamed, "c") is None
    assert verified_author(KEY_BYTES, "ns", "d", {STAMP_ANNOTATION: "alice"}, "c") is None
    assert verified_author(KEY_BYTES, "ns", "d", {}, "c") is None


# --- the webhook configurations -----------------------------------------------------------------


def test_configurations_send_only_defendercomponent_writes_of_watched_namespaces() -> None:
    validating, mutating = webhook_configurations(
        "ml-defender",
        {VALIDATE_ID: {"url": "https://h/validate"}, STAMP_ID: {"url": "https://h/stamp"}},
        watched=["b", "a"],
        failure_policy="Ignore",
        timeout_seconds=5,
    )
    (v,) = validating["webhooks"]
    (m,) = mutating["webhooks"]
    assert validating["kind"] == "ValidatingWebhookConfiguration"
    assert mutating["kind"] == "MutatingWebhookConfiguration"
    assert v["name"] == "validate.defendercomponents.mldefender.io"
    assert v["clientConfig"] == {"url": "https://h/validate"}
    assert m["clientConfig"] == {"url": "https://h/stamp"}
    for hook in (v, m):
        assert hook["failurePolicy"] == "Ignore" and hook["timeoutSeconds"] == 5
        assert hook["rules"][0]["resources"] == ["defendercomponents"]  # not /status
        assert hook["rules"][0]["operations"] == ["CREATE", "UPDATE"]
        assert hook["namespaceSelector"]["matchExpressions"][0]["values"] == ["a", "b"]
    cluster_wide, _ = webhook_configurations(
        "x",
        {VALIDATE_ID: {}, STAMP_ID: {}},
        watched=[],
        failure_policy="Fail",
        timeout_seconds=10,
    )
    assert "namespaceSelector" not in cluster_wide["webhooks"][0]


# --- the certificate --------------------------------------------------------------------------


def test_the_self_signed_certificate_is_issued_by_its_ca_for_every_host() -> None:
    made = self_signed(["svc.ns.svc", "127.0.0.1"], NOW)
    cert = x509.load_pem_x509_certificate(made.cert_pem)
    ca = x509.load_pem_x509_certificate(made.ca_pem)
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["svc.ns.svc"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert b"PRIVATE KEY" in made.key_pem and b"PRIVATE KEY" not in made.cert_pem


def secret_data(hosts: list[str], now: datetime) -> dict[str, str]:
    made = self_signed(hosts, now)
    return {
        CERT: base64.b64encode(made.cert_pem).decode(),
        KEY: base64.b64encode(made.key_pem).decode(),
        CA: base64.b64encode(made.ca_pem).decode(),
    }


def test_a_new_certificate_is_made_when_missing_for_other_hosts_expiring_or_unreadable() -> None:
    hosts = ["127.0.0.1"]
    data = secret_data(hosts, NOW)
    assert not needs_new_cert(data, "127.0.0.1", hosts, NOW)
    assert needs_new_cert({}, "", hosts, NOW)
    assert needs_new_cert(data, "127.0.0.1", ["svc.ns.svc"], NOW)
    assert needs_new_cert(data, "127.0.0.1", hosts, NOW + timedelta(days=3650 - 30))
    garbled = {**data, CERT: base64.b64encode(b"not a certificate").decode()}
    assert needs_new_cert(garbled, "127.0.0.1", hosts, NOW)


def test_a_mounted_certificate_directory_without_its_files_is_a_setup_error(
    tmp_path: Path,
) -> None:
    (tmp_path / CERT).write_bytes(b"x")
    with pytest.raises(AdmissionSetupError, match=r"must hold tls\.crt, tls\.key and ca\.crt"):
        _from_dir(tmp_path)


def test_a_failure_policy_other_than_ignore_or_fail_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DEFENDER_OPERATOR_ADMISSION_FAILURE_POLICY", "Sometimes")
    with pytest.raises(OperatorConfigurationError, match="ADMISSION_FAILURE_POLICY"):
        load_operator_settings()


def test_the_certificate_files_are_private_and_removed_at_stop() -> None:
    from defender_operator import _webhook_setup

    certfile, keyfile = _webhook_setup._write_files(self_signed(["127.0.0.1"], NOW))
    assert keyfile.stat().st_mode & 0o077 == 0
    assert certfile.parent.stat().st_mode & 0o077 == 0
    _webhook_setup.stop()
    assert not keyfile.exists() and not certfile.parent.exists()


# --- reading the webhook configurations back ----------------------------------------------------

KIND = "ValidatingWebhookConfiguration"


def _answering(data: bytes) -> _Configs:
    """`_Configs` whose read gets `data` as the API server's raw answer."""
    configs = _Configs(k8s.AdmissionregistrationV1Api(k8s.ApiClient()))

    def read(name: str, **_: Any) -> Any:
        return type("Raw", (), {"data": data})()

    configs.kinds[KIND] = (read, *configs.kinds[KIND][1:])
    return configs


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"webhooks": ' + b'{"a":' * 5_000 + b"1" + b"}" * 5_000 + b"}",
        b'{"metadata": {"resourceVersion": ' + b"9" * 5_000 + b"}}",
        b"<html>not json</html>",
        b'["a list"]',
    ],
    ids=["nested-100k", "object-nested-5k", "number-of-5k-digits", "not-json", "a-list"],
)
def test_a_webhook_configuration_answer_it_cannot_decode_is_an_admission_setup_error(
    data: bytes,
) -> None:
    """The configuration is written back as read: one nested past Python's decoder raised
    RecursionError out of start-up (json.loads), and one cut would be written back cut."""
    with pytest.raises(AdmissionSetupError, match=f"cannot read {KIND} ml-defender") as info:
        _answering(data).read(KIND, "ml-defender")
    assert "not json" not in str(info.value) and "a list" not in str(info.value)
    body = {
        "kind": KIND,
        "metadata": {"name": "ml-defender", "resourceVersion": "1"},
        "webhooks": [{"name": "v", "clientConfig": {"caBundle": "x"}}],
    }
    assert _answering(json.dumps(body).encode()).read(KIND, "ml-defender") == body
