"""Fixtures for the pure library tests: keyrings and envelopes, no cluster."""

from __future__ import annotations

import pytest

from defender_config import Envelope, EnvelopeOptions, Keyring


@pytest.fixture
def keyring() -> Keyring:
    return Keyring.generate()


@pytest.fixture
def envelope(keyring: Keyring) -> Envelope:
    return Envelope(keyring, EnvelopeOptions())


@pytest.fixture
def config_bytes() -> bytes:
    """A realistic ~4 KiB JSON config: compressible, above the threshold."""
    rules = ",".join(
        f'{{"id":"r{i}","action":"deny","proto":"tcp","src_cidr":"10.{i}.0.0/16","ports":[443]}}'
        for i in range(50)
    )
    head = '"node_id":"fw-01","version":"1.0.0","default_policy":"deny"'
    return f'{{{head},"rules":[{rules}]}}'.encode()
