"""The vault: personal values sealed per subject, tokens for everything else, crypto-shredding.

- `tokens` (a `Tokeniser`) turns personal fields into `pii:<kind>:<hex>` tokens (tokens.py).
- Each subject (normalised user id, else anonymous id) has a key id, `sk_<hex>`, derived with
  its own HMAC key (so a key id is no identity token), and a random data key in the key store
  (keys.py). An event without a subject gets a key of its own, `ek_<hex>`, from its source and
  message id.
- `vault_values` (token, key id, kind, sealed value) keeps each replaced value once per subject,
  sealed with AES-GCM under the subject's data key, bound to the token and key id.
- Raw payloads and quarantined payloads are sealed with the same keys (`seal`/`unseal`).
- `destroy` deletes subject keys: everything sealed with them is unreadable everywhere,
  including immutable files and backups. `suppression_hash` names an erased identifier on the
  suppression list without keeping it or its token.

Settings: docs/privacy.md. Decision: docs/decisions/0014-vault-and-pseudonymisation.md.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from refinery.errors import StorageError
from refinery.privacy.keys import KeyStore, MasterKeyError, derive, load_master_key, seal, unseal
from refinery.privacy.tokens import PiiPolicy, PiiValue, Tokeniser, normal_id
from refinery.storage.engine import Engine

log = logging.getLogger(__name__)

#: Identifier kinds among personal values that name a person on the suppression list.
_SUPPRESSIBLE_KINDS = frozenset({"email", "phone"})


@dataclass(frozen=True, slots=True)
class Sealed:
    key_id: str
    data: bytes


class Vault:
    def __init__(self, master: bytes, keys: KeyStore, policy: PiiPolicy):
        self.keys = keys
        self.policy = policy
        self.tokens = Tokeniser(derive(master, "token"), policy)
        self._subject_mac = hmac.new(derive(master, "subject"), digestmod="sha256")
        self._suppress_mac = hmac.new(derive(master, "suppression"), digestmod="sha256")
        self._secrets = AESGCM(derive(master, "secrets"))
        #: (token, key id) pairs known to be in `vault_values`, to skip sealing them again.
        self._stored: set[tuple[str, str]] = set()
        #: The suppression list (hashes of erased identifiers), mirrored from `suppression_list`.
        self.suppressed: set[str] = set()

    @classmethod
    def open(cls, settings: Any, engine: Engine | None = None) -> Vault:
        """The vault of a data directory. A master key is generated only for a store that has no
        key store yet and no sealed data; otherwise a missing or wrong key stops here, before
        anything is read or written (`MasterKeyError`)."""
        key_store = settings.key_store_path
        fresh = not KeyStore.holds_keys(key_store)
        if fresh and engine is not None and _holds_sealed_data(engine):
            raise MasterKeyError(
                f"The key store {key_store} is missing, but this store holds data sealed with its keys.",
                fix="Restore the key store file (and the master key) from where you keep them; "
                "without them the personal data in this store cannot be read. Nothing was changed.",
            )
        master = load_master_key(settings.master_key_path, create=fresh)
        return cls(master, KeyStore(key_store, master), settings.pii_policy)

    def close(self) -> None:
        self.keys.close()

    # --- naming -----------------------------------------------------------------------------
    def key_id(self, subject: str) -> str:
        mac = self._subject_mac.copy()
        mac.update(b"subject\x1f" + subject.encode())
        return "sk_" + mac.hexdigest()[:32]

    def event_key_id(self, source: str, message_id: str) -> str:
        mac = self._subject_mac.copy()
        mac.update(b"event\x1f" + source.encode() + b"\x1f" + message_id.encode())
        return "ek_" + mac.hexdigest()[:32]

    def suppression_hash(self, kind: str, normal: str) -> str:
        """What the suppression list keeps for an erased identifier (neither it nor its token)."""
        mac = self._suppress_mac.copy()
        mac.update(kind.encode() + b"\x1f" + normal.encode())
        return "sup_" + mac.hexdigest()[:32]

    def load_suppression(self, engine: Engine) -> None:
        """Mirror the suppression list in memory (the writer checks every event against it)."""
        try:
            rows = engine.fetch_all("SELECT hash FROM suppression_list")
        except StorageError:  # a store from before subject requests
            rows = []
        self.suppressed = {r[0] for r in rows}

    def suppressed_identifier(self, kind: str, normal: str) -> bool:
        return bool(self.suppressed) and self.suppression_hash(kind, normal) in self.suppressed

    def suppressed_event(self, event: Mapping[str, Any], values: Iterable[PiiValue]) -> bool:
        """Whether an event belongs to an erased person: its user id, anonymous id, or one of its
        emails or phones (`values`, as `tokens.protect_event` found them) is on the suppression list."""
        if not self.suppressed:
            return False
        for field, kind in (("userId", "user_id"), ("anonymousId", "anonymous_id")):
            text = normal_id(event.get(field))
            if text and self.suppressed_identifier(kind, text):
                return True
        return any(v.kind in _SUPPRESSIBLE_KINDS and self.suppressed_identifier(v.kind, v.value) for v in values)

    # --- sealing ----------------------------------------------------------------------------
    def seal_secret(self, name: str, plaintext: str) -> bytes:
        """Seal a configuration secret (a destination's password or signing key) under a key derived
        from the master key, bound to `name` so a sealed value cannot be moved to another place."""
        return seal(self._secrets, plaintext.encode(), b"secret\x1f" + name.encode())

    def unseal_secret(self, name: str, sealed: bytes) -> str:
        return unseal(self._secrets, sealed, b"secret\x1f" + name.encode()).decode()

    def seal_many(self, key_ids: Sequence[str], plaintexts: Sequence[bytes | None]) -> list[bytes | None]:
        """Seal each plaintext under its key id (keys created as needed, committed first)."""
        keys = self.keys.get(key_ids, create=True)
        return [None if p is None else seal(keys[k], p, k.encode()) for k, p in zip(key_ids, plaintexts, strict=True)]

    def unseal_many(self, key_ids: Sequence[str | None], sealed: Sequence[bytes | None]) -> list[bytes | None]:
        """The plaintexts; None where the key was destroyed (erased) or nothing was sealed."""
        keys = self.keys.get([k for k in key_ids if k], create=False)
        out: list[bytes | None] = []
        for k, data in zip(key_ids, sealed, strict=True):
            aead = keys.get(k) if k else None
            if aead is None or data is None:
                out.append(None)
                continue
            try:
                out.append(unseal(aead, bytes(data), k.encode()))  # type: ignore[union-attr]
            except InvalidTag:
                log.error("vault: a sealed value failed its integrity check (key %s)", k)
                out.append(None)
        return out

    # --- the values -------------------------------------------------------------------------
    def put_values(self, engine: Engine, values: Iterable[tuple[str, PiiValue]]) -> int:
        """Seal and store (key id, value) pairs not stored yet; inside the caller's transaction."""
        todo = {(v.token, k): v for k, v in values if (v.token, k) not in self._stored}
        if not todo:
            return 0
        pairs = list(todo)
        key_ids = [k for _, k in pairs]
        sealed = self.seal_many(key_ids, [todo[p].value.encode() for p in pairs])
        table = pa.table({
            "token": pa.array([t for t, _ in pairs], pa.string()),
            "key_id": pa.array(key_ids, pa.string()),
            "kind": pa.array([todo[p].kind for p in pairs], pa.string()),
            "sealed": pa.array(sealed, pa.binary()),
        })
        engine.register("_vault_new", table)
        try:
            engine.execute(
                "INSERT INTO vault_values (token, key_id, kind, sealed, first_seen) "
                "SELECT token, key_id, kind, sealed, ? FROM _vault_new ON CONFLICT DO NOTHING",
                [datetime.now(UTC)],
            )
        finally:
            engine.unregister("_vault_new")
        engine.after_commit(lambda: self._remember_stored(pairs))
        return len(pairs)

    def _remember_stored(self, pairs: list[tuple[str, str]]) -> None:
        if len(self._stored) > 500_000:
            self._stored.clear()
        self._stored.update(pairs)

    def forget_stored(self) -> None:
        """Drop the memo of stored pairs (after a rollback or an erasure)."""
        self._stored.clear()

    def reveal(self, engine: Engine, tokens: Iterable[str]) -> dict[str, str]:
        """The values behind `tokens`, from any subject whose key still exists. Tokens of erased
        people (or unknown ones) are absent from the answer."""
        wanted = sorted(set(tokens))
        if not wanted:
            return {}
        rows = engine.fetch_all(
            "SELECT token, key_id, sealed FROM vault_values WHERE token IN (SELECT unnest(CAST(? AS VARCHAR[]))) "
            "ORDER BY token, first_seen DESC",
            [wanted],
        )
        out: dict[str, str] = {}
        plain = self.unseal_many([k for _, k, _ in rows], [s for _, _, s in rows])
        for (token, _, _), value in zip(rows, plain, strict=True):
            if value is not None and token not in out:
                out[token] = value.decode()
        return out

    def destroy(self, key_ids: Iterable[str]) -> int:
        """Crypto-shred: delete the data keys. Returns how many existed."""
        n = self.keys.destroy(key_ids)
        self.forget_stored()
        return n


def _holds_sealed_data(engine: Engine) -> bool:
    try:
        return bool(engine.fetch_all("SELECT EXISTS (SELECT 1 FROM vault_values)")[0][0])
    except StorageError:  # no vault table yet: a store from before the vault
        return False
