"""spec.customSchema edits take effect: the next commit is validated against the edited schema
(by the operator and by the library, which used to check the schema stored at seed time), and
every version records the digest of the schema that validated it. Real control plane, real
defender etcd."""

from __future__ import annotations

from typing import Any

import pytest
from operator_e2e_support import OperatorRun, wait_for

from defender_config import ChangeKind, ConfigValidationError, config_digest, contract

pytestmark = [pytest.mark.cluster, pytest.mark.etcd]

NAME = "honeypot"


def _schema(*fields: str) -> dict[str, Any]:
    props: dict[str, Any] = {
        "ports": {"type": "array", "items": {"type": "integer", "maximum": 65535}}
    }
    props.update({f: {"type": "string"} for f in fields})
    return {
        "type": "object",
        "required": ["ports"],
        "additionalProperties": False,
        "properties": props,
    }


def _create(run: OperatorRun, config: dict[str, Any], schema: dict[str, Any]) -> None:
    doc = {
        "apiVersion": contract.GROUP_VERSION,
        "kind": contract.KIND,
        "metadata": {"name": NAME},
        "spec": {
            "componentType": contract.ComponentType.CUSTOM.value,
            "selector": {"matchLabels": {"app.kubernetes.io/name": NAME}},
            "config": config,
            "customSchema": schema,
        },
    }
    run.custom.create_namespaced_custom_object(
        contract.API_GROUP, contract.API_VERSION, run.namespace, contract.PLURAL, doc
    )


def test_an_edited_custom_schema_governs_the_next_commit(operator_run: OperatorRun) -> None:
    run = operator_run
    run.start()
    first = _schema()
    _create(run, {"ports": [2222]}, first)
    run.wait_active_version(NAME, 1)
    configs = run.configs()
    meta = configs.get_metadata(NAME)
    assert meta is not None
    assert meta.change is ChangeKind.REGISTER
    assert meta.schema_digest == config_digest(first)

    # The schema now allows `banner`; a config using it is committed in the same edit.
    second = _schema("banner")
    run.patch(
        NAME,
        {"spec": {"customSchema": second, "config": {"ports": [2222], "banner": "SSH-2.0"}}},
    )
    run.wait_active_version(NAME, 2)
    run.wait_condition(NAME, "ConfigSynced", status="True")
    active = configs.get_active(NAME)
    assert active.config["banner"] == "SSH-2.0"
    meta = configs.get_metadata(NAME)
    assert meta is not None
    assert (meta.version, meta.change) == (2, ChangeKind.COMMIT)
    assert meta.schema_digest == config_digest(second)
    assert meta.json_schema == second

    # A config the new schema refuses is refused; ACTIVE stays at version 2.
    run.patch(NAME, {"spec": {"config": {"ports": [2222], "banner": 7}}})
    cond = run.wait_condition(NAME, "ConfigSynced", status="False", reason="ConfigInvalid")
    assert "banner" in cond["message"]
    run.wait_event(NAME, "ConfigInvalid")
    assert configs.get_active(NAME).version == 2

    # A schema-only edit (spec.config back to the valid version-2 config) writes no version,
    # but it is recorded: a commit by someone else (rag, the plugin) is validated with it.
    third = _schema("banner", "motd")
    run.patch(
        NAME,
        {"spec": {"customSchema": third, "config": {"ports": [2222], "banner": "SSH-2.0"}}},
    )
    wait_for(
        "schema-only edit recorded",
        lambda: (m := configs.get_metadata(NAME)) is not None and m.json_schema == third,
    )
    meta = configs.get_metadata(NAME)
    assert meta is not None and meta.version == 2
    assert meta.schema_digest == config_digest(second)  # what validated version 2
    version = configs.commit(NAME, {"ports": [2222], "banner": "SSH-2.0", "motd": "hi"}, by="rag")
    assert version == 3
    meta = configs.get_metadata(NAME)
    assert meta is not None and meta.schema_digest == config_digest(third)
    with pytest.raises(ConfigValidationError, match="telnet"):
        configs.commit(NAME, {"ports": [2222], "telnet": "yes"}, by="rag")
    assert configs.get_active(NAME).version == 3


def test_a_config_with_thousands_of_errors_is_reported_within_the_status_limits(
    operator_run: OperatorRun,
) -> None:
    # Every error listed made a condition message of ~190 KB, over the 32 KiB the CRD allows:
    # the API server refused the status patch and the refusal never showed.
    run = operator_run
    run.start()
    _create(run, {"ports": [70000 + i for i in range(5000)]}, _schema())
    cond = run.wait_condition(NAME, "ConfigSynced", status="False", reason="ConfigInvalid")
    message = cond["message"]
    assert len(message) <= 4096, len(message)
    assert "5000 errors" in message and "ports.0: 70000 is greater than the maximum" in message
    assert "and 4980 more" in message
    run.wait_event(NAME, "ConfigInvalid")
