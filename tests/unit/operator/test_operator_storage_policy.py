"""spec.storage → the library's StoragePolicy, and the seal options the backend derives."""

from __future__ import annotations

from defender_config import EnvelopeOptions, StoragePolicy
from defender_operator import _api
from defender_operator._reconcile import storage_policy


def spec_storage(**raw: object) -> _api.StorageSpec:
    return _api.StorageSpec.model_validate(raw)


def test_defaults_compress_and_encrypt() -> None:
    assert storage_policy(spec_storage()) == StoragePolicy(
        compress=True, encrypt=True, level=3, threshold_bytes=256
    )


def test_each_switch_and_setting_is_carried() -> None:
    policy = storage_policy(
        spec_storage(
            compression={"enabled": False, "level": 19, "thresholdBytes": 4096},
            encryption={"enabled": False},
        )
    )
    assert policy == StoragePolicy(compress=False, encrypt=False, level=19, threshold_bytes=4096)


def test_write_options_keep_store_wide_codecs_and_caps() -> None:
    base = EnvelopeOptions(cipher="chacha20-poly1305", max_decompressed_bytes=1024)
    policy = storage_policy(spec_storage(compression={"level": 7}, encryption={"enabled": False}))
    opts = policy.write_options(base)
    assert (opts.compress, opts.encrypt, opts.level) == (True, False, 7)
    assert (opts.cipher, opts.max_decompressed_bytes) == ("chacha20-poly1305", 1024)
