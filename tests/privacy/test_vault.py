"""The vault: tokens, sealing, crypto-shredding, and the master key checked before anything is touched."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from refinery.privacy.keys import MasterKeyError, derive
from refinery.privacy.tokens import PiiPolicy, Tokeniser, is_token, subject_of, truncate_ip
from refinery.runtime import Runtime
from refinery.settings import Settings
from support import event, fresh_runtime, write_events

KEY = b"k" * 32


def test_a_token_is_the_hmac_of_kind_and_normal_form() -> None:
    t = Tokeniser(KEY)
    token, normal = t.tokenise("email", "  Jane.Doe@Example.COM ")
    assert normal == "jane.doe@example.com"
    expected = hmac.new(KEY, b"email\x1fjane.doe@example.com", hashlib.sha256).hexdigest()[:32]
    assert token == f"pii:email:{expected}" and is_token(token)
    assert t.tokenise("email", "jane.doe@example.com")[0] == token
    assert t.tokenise("name", "jane.doe@example.com")[0] != token  # the kind is part of the token
    assert Tokeniser(b"x" * 32).tokenise("email", normal)[0] != token  # and the key


def test_phones_are_tokenised_in_e164_with_the_event_s_country() -> None:
    t = Tokeniser(KEY, PiiPolicy(phone_region="US"))
    assert t.tokenise("phone", "(415) 555-0100")[1] == "+14155550100"
    assert t.tokenise("phone", "020 7946 0000", "GB")[1] == "+442079460000"
    assert t.tokenise("phone", "+1 415 555 0100")[0] == t.tokenise("phone", "(415) 555-0100")[0]


def test_protect_event_replaces_personal_fields_and_is_idempotent() -> None:
    t = Tokeniser(KEY)
    ev = {
        "userId": "u1", "type": "identify",
        "traits": {"email": "A@B.io", "firstName": "Ann", "plan": "pro", "address": {"street": "1 High St", "city": "York"}},
        "properties": {"email": "a@b.io", "name": "Blue shoes"},
        "context": {"ip": "203.0.113.7", "traits": {"phone": "+1 415 555 0100"}},
    }
    out, values = t.protect_event(ev)
    assert out["traits"]["plan"] == "pro" and out["properties"]["name"] == "Blue shoes"  # not personal
    assert all(is_token(v) for v in (out["traits"]["email"], out["traits"]["firstName"], out["traits"]["address"],
                                     out["properties"]["email"], out["context"]["ip"], out["context"]["traits"]["phone"]))
    assert out["traits"]["email"] == out["properties"]["email"]  # equal values, equal tokens: joins work
    assert {v.kind for v in values} == {"email", "first_name", "address", "ip", "phone"}
    assert ev["traits"]["email"] == "A@B.io"  # the input is not changed
    again, more = t.protect_event(out)
    assert again == out and more == []


def test_ip_truncation_and_keeping() -> None:
    assert truncate_ip("203.0.113.77") == "203.0.113.0"
    assert truncate_ip("2001:db8:85a3:8d3:1319:8a2e:370:7348") == "2001:db8:85a3::"
    assert truncate_ip("not an ip") == ""
    out, values = Tokeniser(KEY, PiiPolicy(ip="truncate")).protect_event({"context": {"ip": "198.51.100.9"}})
    assert out["context"]["ip"] == "198.51.100.0" and values == []
    out, _ = Tokeniser(KEY, PiiPolicy(ip="keep")).protect_event({"context": {"ip": "198.51.100.9"}})
    assert out["context"]["ip"] == "198.51.100.9"


@given(st.text(min_size=1, max_size=30))
def test_subject_of_is_the_normal_form_identity_resolution_gives_ids(user_id: str) -> None:
    from refinery.privacy.normalise import normalise

    subject = subject_of({"userId": user_id, "anonymousId": "a"})
    n = normalise("user_id", user_id)
    assert subject == (n.value if n.value else "a")


def test_hkdf_gives_independent_keys_per_purpose() -> None:
    assert len({derive(KEY, p) for p in ("token", "subject", "suppression", "key-encryption")}) == 4


def test_events_are_stored_as_tokens_and_sealed_and_shredding_a_subject_leaves_others(tmp_path: Path) -> None:
    with fresh_runtime(tmp_path) as rt:
        outcomes = write_events(
            rt,
            event("identify", userId="ann", traits={"email": "ann@shop.io", "name": "Ann Lee"}),
            event("identify", userId="bob", traits={"email": "bob@shop.io", "name": "Bob Roe"}),
        )
        assert [o.status for o in outcomes] == ["loaded", "loaded"]
        engine = rt.engine
        traits = [r[0] for r in engine.fetch_all("SELECT CAST(traits AS VARCHAR) FROM events ORDER BY user_id")]
        assert "ann@shop.io" not in traits[0] and "Ann Lee" not in traits[0] and "pii:email:" in traits[0]
        raw = engine.fetch_all("SELECT payload, key_id, sealed FROM raw_events ORDER BY raw_id")
        assert all(p is None and s is not None and b"ann@shop.io" not in bytes(s) for p, _, s in raw)
        ann_key, bob_key = rt.vault.key_id("ann"), rt.vault.key_id("bob")
        assert [k for _, k, _ in raw] == [ann_key, bob_key]
        ann_token = rt.vault.tokens.tokenise("email", "ann@shop.io")[0]
        bob_token = rt.vault.tokens.tokenise("email", "bob@shop.io")[0]
        assert rt.vault.reveal(engine, [ann_token, bob_token]) == {ann_token: "ann@shop.io", bob_token: "bob@shop.io"}

        assert rt.vault.destroy([ann_key]) == 1
        assert rt.vault.reveal(engine, [ann_token, bob_token]) == {bob_token: "bob@shop.io"}
        opened = rt.vault.unseal_many([k for _, k, _ in raw], [s for _, _, s in raw])
        assert opened[0] is None and opened[1] is not None and b"bob@shop.io" in opened[1]
        # The key store keeps no copy of the destroyed key, in the file or its write-ahead log.
        key_files = [p for p in rt.settings.key_store_path.parent.iterdir() if p.name.startswith("subject-keys")]
        assert key_files and rt.vault.keys.count() == 1


def _start(data: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "refinery", "query", "SELECT count(*) FROM events"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "REFINERY_DATA_DIR": str(data), "COLUMNS": "200", **env},
    )


def test_a_missing_or_wrong_master_key_stops_start_up_before_anything_is_touched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    with Runtime.open(Settings(data_dir=data, admin_token="t")) as rt:
        write_events(rt, event("identify", userId="ann", traits={"email": "ann@shop.io"}))
    key_file = data / "keys" / "master.key"
    database = data / "refinery.duckdb"
    before = database.read_bytes()

    moved = tmp_path / "master.key.kept"
    key_file.rename(moved)
    with pytest.raises(MasterKeyError, match="master key is missing"):
        Runtime.open(Settings(data_dir=data, admin_token="t"))
    missing = _start(data, {})
    assert missing.returncode != 0 and "master key is missing" in missing.stderr + missing.stdout
    assert not key_file.exists(), "a missing key must never be replaced by a new one"

    wrong = base64.b64encode(os.urandom(32)).decode()
    with monkeypatch.context() as m:
        m.setenv("REFINERY_MASTER_KEY", wrong)
        with pytest.raises(MasterKeyError, match="not the key this vault was created with"):
            Runtime.open(Settings(data_dir=data, admin_token="t"))
    bad = _start(data, {"REFINERY_MASTER_KEY": "not base64!"})
    assert bad.returncode != 0 and "not base64" in bad.stderr + bad.stdout
    assert database.read_bytes() == before, "the database was touched"

    moved.rename(key_file)
    with Runtime.open(Settings(data_dir=data, admin_token="t")) as rt:
        assert rt.engine.fetch_all("SELECT count(*) FROM events")[0][0] == 1


def test_a_missing_key_store_with_sealed_data_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with Runtime.open(Settings(data_dir=data, admin_token="t")) as rt:
        write_events(rt, event("identify", userId="ann", traits={"email": "ann@shop.io"}))
    store = data / "keys" / "subject-keys.sqlite"
    store.rename(tmp_path / "kept.sqlite")
    with pytest.raises(MasterKeyError, match="key store .* is missing"):
        Runtime.open(Settings(data_dir=data, admin_token="t"))
