"""Entity-key versions (issue 17, section 3): the key format, the configured secrets, validation, the offline
column rewrite. The oracle for a key is the contract's own words: HMAC-SHA256 of the PAN, hex, first 32 chars;
version N >= 2 spelled `kN.` before it, version 1 bare (so stores written before versions stay valid)."""

from __future__ import annotations

import hashlib
import hmac
import pickle

import pyarrow as pa
import pytest

from featurestore.entity import EntityKeyer, EntitySecrets, UnknownKeyVersion, entity_key, key_version
from featurestore.events import InvalidEvent, is_entity_key, validate_transaction

PAN = "4539578763621486"
OLD, NEW = "old-secret-for-tests", "new-secret-for-tests"


def hmac32(pan: str, secret: str) -> str:
    return hmac.new(secret.encode(), pan.encode(), hashlib.sha256).hexdigest()[:32]


def event(card: str) -> dict:
    return {"txn_id": "t1", "card": card, "pan_last4": "1486", "amount": 10.5, "ts": 1_600_000_000_000,
            "merchant": "m", "category": "c"}


@pytest.mark.unit
def test_versioned_keys_follow_the_contract_and_version_1_is_unchanged():
    ring = EntitySecrets.parse(f"2:{NEW},1:{OLD}")
    assert ring.current == 2 and ring.previous == 1 and str(ring) == NEW
    assert ring.key(PAN) == "k2." + hmac32(PAN, NEW) == entity_key(PAN, ring)
    assert ring.key(PAN, 1) == hmac32(PAN, OLD) == entity_key(PAN, OLD)  # today's keys: version 1, unchanged
    assert key_version(ring.key(PAN)) == 2 and key_version(hmac32(PAN, OLD)) == 1
    keyer = EntityKeyer(ring)
    assert keyer.rotating and keyer(PAN) == "k2." + hmac32(PAN, NEW)
    assert keyer.previous_key(keyer(PAN)) == hmac32(PAN, OLD)
    assert not EntityKeyer(OLD).rotating and EntityKeyer(OLD).previous_key(hmac32(PAN, OLD)) is None
    # Only the highest version signs, whatever the order written; a secret never shows in repr or pickle's repr.
    assert EntitySecrets.parse(f"1:{OLD},2:{NEW}").key(PAN) == "k2." + hmac32(PAN, NEW)
    assert NEW not in repr(ring) and OLD not in repr(ring)
    again = pickle.loads(pickle.dumps(ring))  # replay's producer processes get it pickled
    assert again.key(PAN, 1) == ring.key(PAN, 1) and again.key(PAN) == ring.key(PAN)


@pytest.mark.unit
def test_unknown_versions_and_bad_specs_are_refused_clearly():
    ring = EntitySecrets.parse(f"2:{NEW},1:{OLD}")
    with pytest.raises(UnknownKeyVersion, match=r"entity-key version 9 is not configured \(known: 1, 2\)"):
        ring.version_of("k9." + hmac32(PAN, NEW))
    with pytest.raises(UnknownKeyVersion, match="version 1 is not configured"):
        EntitySecrets.parse(f"2:{NEW}").version_of(hmac32(PAN, OLD))
    for bad in ("k1." + "a" * 32, "k0." + "a" * 32, "k02." + "a" * 32, "K2." + "a" * 32, "k2." + "A" * 32,
                "k2" + "a" * 32, "a" * 31, PAN):
        assert not is_entity_key(bad), bad
        with pytest.raises(ValueError, match="not an entity key"):
            key_version(bad)
    assert is_entity_key("k2." + "a" * 32) and is_entity_key("k999." + "0" * 32) and is_entity_key("f" * 32)
    for spec, words in (("2new", "entry 1 is not VERSION:SECRET"), ("x:1", "entry 1 is not VERSION:SECRET"),
                        (f"2:{NEW},2:{OLD}", "version 2 is listed twice"), ("2:", "version 2 has an empty secret"),
                        ("1000:s", "1..999")):
        with pytest.raises(ValueError, match=words) as got:
            EntitySecrets.parse(spec)
        assert NEW not in str(got.value) and OLD not in str(got.value)


@pytest.mark.unit
def test_settings_read_the_versions_and_keep_the_single_secret_as_version_1(monkeypatch, tmp_path):
    from featurestore.config import Settings

    monkeypatch.delenv("VELOCITY_ENTITY_SECRETS", raising=False)
    monkeypatch.setenv("VELOCITY_ENTITY_SECRET", OLD)
    plain = Settings()
    assert plain.entity_secret == OLD and entity_key(PAN, plain.entity_secret) == hmac32(PAN, OLD)
    monkeypatch.setenv("VELOCITY_ENTITY_SECRETS", f"2:{NEW}")
    ring = Settings().entity_secret
    assert ring.key(PAN) == "k2." + hmac32(PAN, NEW) and ring.key(PAN, 1) == hmac32(PAN, OLD)
    monkeypatch.delenv("VELOCITY_ENTITY_SECRET")
    assert sorted(Settings().entity_secret.versions) == [2]  # after the rotation: the old one dropped
    monkeypatch.delenv("VELOCITY_ENTITY_SECRETS")
    secrets_file = tmp_path / "secrets"
    secrets_file.write_text(f"# rotation of 2026-11\n3:{NEW}\n2:{OLD}\n")
    monkeypatch.setenv("VELOCITY_ENTITY_SECRETS_FILE", str(secrets_file))
    ring = Settings().entity_secret
    assert ring.current == 3 and ring.key(PAN, 2) == "k2." + hmac32(PAN, OLD)
    # A malformed setting is one line naming the entry, never the secrets (pydantic would print its input).
    from featurestore.entity import SecretsConfigError

    monkeypatch.delenv("VELOCITY_ENTITY_SECRETS_FILE")
    monkeypatch.setenv("VELOCITY_ENTITY_SECRETS", f"{NEW},1:{OLD}")
    with pytest.raises(SecretsConfigError, match="entry 1 is not VERSION:SECRET") as got:
        Settings()
    assert NEW not in str(got.value) and OLD not in str(got.value) and "\n" not in str(got.value)


@pytest.mark.unit
def test_worker_validation_takes_configured_versions_and_refuses_others():
    ring = EntitySecrets.parse(f"2:{NEW},1:{OLD}")
    v2 = "k2." + hmac32(PAN, NEW)
    assert validate_transaction(event(v2), EntityKeyer(ring)).card == v2
    assert validate_transaction(event(hmac32(PAN, OLD)), EntityKeyer(ring)).card == hmac32(PAN, OLD)
    with pytest.raises(InvalidEvent, match="entity-key version 2 is not configured") as got:
        validate_transaction(event(v2), EntityKeyer(OLD))  # a worker not given the new secret
    assert got.value.reason == "bad_field"
    with pytest.raises(InvalidEvent, match="version 7 is not configured"):
        validate_transaction(event("k7." + hmac32(PAN, NEW)), EntityKeyer(ring))
    # An outside producer's PAN is tokenized with the current version.
    raw = {**event("x"), "cc_num": PAN}
    del raw["card"], raw["pan_last4"]
    assert validate_transaction(raw, EntityKeyer(ring)).card == v2


@pytest.mark.unit
def test_offline_rewrite_maps_old_keys_and_leaves_others():
    from stores.rekey_offline import rekey_table

    table = pa.table({"card": ["a" * 32, "b" * 32, None, "a" * 32], "n": [1, 2, 3, 4]})
    out, changed = rekey_table(table, "card", pa.array(["a" * 32]), pa.array(["k2." + "c" * 32]))
    assert changed == 2
    assert out.column("card").to_pylist() == ["k2." + "c" * 32, "b" * 32, None, "k2." + "c" * 32]
    assert out.column("n").to_pylist() == [1, 2, 3, 4] and out.schema == table.schema
    again, changed = rekey_table(out, "card", pa.array(["a" * 32]), pa.array(["k2." + "c" * 32]))
    assert changed == 0 and again is out  # idempotent: nothing left to map


@pytest.mark.unit
def test_merged_card_state_keeps_maxima_and_the_oldest():
    from stores.rekey_online import merge_state

    assert merge_state(b"10|500|100|", b"20|400|50|7") == "20|500|50|7"
    assert merge_state(None, b"1|2|3|") == "1|2|3|" and merge_state(None, None) == ""
