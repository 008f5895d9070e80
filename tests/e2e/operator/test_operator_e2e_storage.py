"""spec.storage is applied: the raw etcd values of a DefenderComponent are sealed as its spec
says (header read with `inspect`), and a storage-only edit re-seals them without a new version."""

from __future__ import annotations

import pytest
from operator_e2e_support import OperatorRun, wait_for

from defender_config import CodecMismatchError, ConfigStore, EnvelopeHeader, inspect

pytestmark = [pytest.mark.cluster, pytest.mark.etcd]

NAME = "firewall"  # its sample config (about 700 bytes) is over the compression threshold


def header(run: OperatorRun, which: str) -> EnvelopeHeader:
    client = run.client()
    path = getattr(client.layout, which)(NAME)
    stored = client.store.get(path)
    assert stored is not None, path
    return inspect(stored.value)


def test_compression_off_then_encryption_off(operator_run: OperatorRun) -> None:
    run = operator_run
    run.start()
    run.apply_sample(NAME, storage={"compression": {"enabled": False}})
    run.wait_active_version(NAME, 1)
    for which in ("active_config", "master_config"):
        h = header(run, which)
        assert (h.compressed, h.encrypted, h.compression) == (False, True, "none"), which
    configs = run.configs()
    active = configs.get_active(NAME)
    assert active.version == 1 and active.config["node_id"]

    # Storage-only edit: compression back on, encryption off. Same config, same version.
    run.patch(
        NAME,
        {"spec": {"storage": {"compression": {"enabled": True}, "encryption": {"enabled": False}}}},
    )
    wait_for(
        "ACTIVE re-sealed compressed and unencrypted",
        lambda: (lambda h: h.compressed and not h.encrypted)(header(run, "active_config")),
        timeout=60,
    )
    h = header(run, "master_config")
    assert (h.compressed, h.encrypted, h.key_id) == (True, False, None)
    run.wait_event(NAME, "StorageChanged")
    # A reader whose store-wide options encrypt refuses it: only a reader whose own settings
    # list the component reads it unencrypted; the metadata record decides nothing.
    assert configs.client.envelope.options.encrypt
    with pytest.raises(CodecMismatchError):
        configs.get_active(NAME)
    lenient = ConfigStore(configs.client, plaintext_components={NAME})
    again = lenient.get_active(NAME)
    assert (again.version, again.config) == (1, active.config)
    assert run.get(NAME)["status"]["activeVersion"] == 1
