"""The domain vocabulary has one home (`defender_config.contract`): every program reads it from
there, the rollback-target grammar is decided once, and metadata records say what made a
version (with records from before the field still readable)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from defender_agent import _settings as agent_settings
from defender_cli import _app as cli_app
from defender_cli import _commands as cli_commands
from defender_cli import _keyring_commands as cli_keys
from defender_config import (
    ChangeKind,
    ComponentType,
    ConfigMetadata,
    DefenderConfigError,
    InvalidConfigPolicy,
    InvalidRollbackTargetError,
    LibrarySettings,
    contract,
    format_rollback_target,
    parse_rollback_target,
)
from defender_config import _models as models
from defender_operator import _api, _keys, crdgen


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("master", "master"),
        ("MASTER", "master"),
        (" Master\n", "master"),
        ("1", 1),
        ("12", 12),
        (" 7 ", 7),
        ("0000000007", 7),
        ("9999999999", 9_999_999_999),
    ],
)
def test_rollback_targets_parse_one_way(text: str, target: object) -> None:
    assert parse_rollback_target(text) == target


@pytest.mark.parametrize(
    "text",
    [
        *["", "   ", "0", "0000000000", "-1", "+3", "1.5", "1 2", "latest", "yesterday"],
        "master2",
        # Digits int() reads but a person would not type: Arabic-Indic, full-width, superscript.
        *["٣", "\uff13", "²"],
        # Longer than any version etcd's history keys can hold (10 digits), leading zeros too.
        *["10000000000", "00000000001", "9" * 5000],
    ],
)
def test_bad_rollback_targets_are_a_typed_error_naming_the_grammar(text: str) -> None:
    with pytest.raises(InvalidRollbackTargetError) as info:
        parse_rollback_target(text)
    assert isinstance(info.value, DefenderConfigError) and isinstance(info.value, ValueError)
    assert info.value.reason == "InvalidRollbackTarget"
    assert "use `master` or a version number from 1 to 9999999999" in str(info.value)


def test_a_long_bad_rollback_target_is_quoted_only_in_part() -> None:
    # The message goes into an Event and the webhook's answer.
    with pytest.raises(InvalidRollbackTargetError) as info:
        parse_rollback_target("9" * 5000)
    assert f"{'9' * 32}..." in str(info.value) and len(str(info.value)) < 200
    assert info.value.text == "9" * 5000


@pytest.mark.parametrize("target", ["master", 1, 42])
def test_a_formatted_target_parses_back_to_itself(target: contract.RollbackTarget) -> None:
    assert parse_rollback_target(format_rollback_target(target)) == target


def test_invalid_config_policy_has_one_spelling_and_reads_the_old_ones() -> None:
    assert [p.value for p in InvalidConfigPolicy] == ["Reject", "RevertToMaster"]
    assert InvalidConfigPolicy("keep") is InvalidConfigPolicy.REJECT
    assert InvalidConfigPolicy("revert_to_master") is InvalidConfigPolicy.REVERT_TO_MASTER
    assert InvalidConfigPolicy("reverttomaster") is InvalidConfigPolicy.REVERT_TO_MASTER
    with pytest.raises(ValueError):
        InvalidConfigPolicy("rollback")


def test_every_program_uses_the_contract_not_a_copy() -> None:
    # The operator's API, the agent's settings and the library's models name one enum.
    assert _api.ComponentTypeName is ComponentType
    assert agent_settings.ComponentTypeName is ComponentType
    assert models.ComponentType is ComponentType
    assert _api.InvalidConfigPolicy is InvalidConfigPolicy
    assert _api.RetentionPolicy is contract.RetentionPolicy
    assert cli_commands.ROLLBACK_ANNOTATION is contract.ROLLBACK_ANNOTATION
    assert cli_keys.LABELS is contract.KEYRING_LABELS
    assert _keys.LABELS is contract.KEYRING_LABELS
    assert _keys.A_STAGE == contract.ROTATION_STAGE_ANNOTATION
    assert _api.ROTATE_ANNOTATION == contract.ROTATE_ANNOTATION


def test_the_crd_is_rendered_from_the_contract_names() -> None:
    crd = crdgen.crd()
    assert crd["metadata"]["name"] == f"{contract.PLURAL}.{contract.API_GROUP}"
    assert crd["spec"]["names"]["kind"] == contract.KIND
    assert [v["name"] for v in crd["spec"]["versions"]] == [contract.API_VERSION]


def test_the_history_limit_bounds_are_the_contracts() -> None:
    # The CRD's default is what `rollback --direct` keeps for a spec that does not say; the
    # library's default and the plugin's --history-limit range are the same numbers.
    schema = crdgen.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    field = schema["properties"]["spec"]["properties"]["rollout"]["properties"]["historyLimit"]
    assert (field["default"], field["minimum"], field["maximum"]) == (
        contract.DEFAULT_HISTORY_LIMIT,
        1,
        contract.MAX_HISTORY_LIMIT,
    )
    assert LibrarySettings().history_limit == contract.DEFAULT_HISTORY_LIMIT
    assert cli_app.HISTORY_LIMIT_MAX == contract.MAX_HISTORY_LIMIT


def _meta(**extra: object) -> dict[str, object]:
    return {
        "version": 3,
        "last_modified": datetime(2026, 1, 1, tzinfo=UTC).isoformat(),
        "modified_by": "someone",
        "digest": "0" * 64,
        "type": "firewall",
        **extra,
    }


@pytest.mark.parametrize(
    ("note", "change"),
    [
        ("registered", ChangeKind.REGISTER),
        ("rollback to master", ChangeKind.ROLLBACK),
        ("rollback to 4", ChangeKind.ROLLBACK),
        ("re-signed", ChangeKind.REPAIR),
        ("re-created", ChangeKind.REPAIR),
        ("edited by rag", ChangeKind.COMMIT),
        (None, ChangeKind.COMMIT),
    ],
)
def test_records_written_before_the_change_field_still_read(
    note: str | None, change: ChangeKind
) -> None:
    meta = ConfigMetadata.model_validate(_meta(note=note))
    assert meta.change is change
    assert meta.schema_digest is None


def test_the_change_field_wins_over_the_note() -> None:
    meta = ConfigMetadata.model_validate(_meta(note="rollback to 2", change="breaker-revert"))
    assert meta.change is ChangeKind.BREAKER_REVERT
    again = ConfigMetadata.model_validate(meta.model_dump(mode="json"))
    assert again.change is ChangeKind.BREAKER_REVERT


def test_an_unknown_change_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="change"):
        ConfigMetadata.model_validate(_meta(change="teleport"))


@pytest.mark.parametrize(
    ("change", "reverts"),
    [
        (ChangeKind.REGISTER, False),
        (ChangeKind.COMMIT, False),
        (ChangeKind.REPAIR, False),
        (ChangeKind.ROLLBACK, True),
        (ChangeKind.BREAKER_REVERT, True),
        (ChangeKind.INVALID_REVERT, True),
    ],
)
def test_which_changes_put_an_earlier_config_back(change: ChangeKind, reverts: bool) -> None:
    assert change.reverts is reverts
