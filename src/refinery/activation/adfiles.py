"""The ad-platform audience files destination: hashed customer lists, as add and remove files.

Ad platforms match uploaded customer lists on SHA-256 hashes of normalised emails and phones. For
each batch this writes, atomically and named by the batch id (so a repeat rewrites the same files):

- `<batch>.add.csv` and `<batch>.remove.csv`: a header, then one row per email/phone pair, each a
  lower-case hex SHA-256 of the normalised value (a profile with two emails gives two rows);
- `<batch>.manifest.json`: row counts, and the profile ids that could not be written because they
  had no usable email or phone (nothing is dropped without a trace).

Normalisation (refinery.privacy.normalise, the same as identity resolution uses):

- email: Unicode NFKC, invisible characters removed, whitespace trimmed, lower-cased; a value
  without one `@` between a local part and a domain is not usable;
- phone: parsed with libphonenumber (numbers without a country code read in `default_region`) and
  written in E.164. Meta's Custom Audiences want the digits with the country code and no `+`
  (`15551234567`); Google's Customer Match and TikTok want E.164 with the `+` (`+15551234567`).

`platform` picks the rules and the header: `meta` (Custom Audiences customer list: columns
`email`, `phone`, digits-only phones; the notes in docs/activation.md name the upload guides),
`google` (Customer Match: columns `Email`, `Phone`, E.164 phones with `+`). Google's rule for
Enhanced Conversions that drops dots in gmail.com addresses is for conversions, not customer lists,
and is not applied.

The sync's mapping must produce fields named `email` and/or `phone` (a string or a list of strings).
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any, Literal

import orjson
from pydantic import BaseModel, Field, field_validator

from refinery.activation.destination import Batch, DestinationContext, DestinationType, Record, register
from refinery.activation.files import delivery_error, file_stem, resolve_folder, write_atomically
from refinery.privacy.normalise import normalise

Platform = Literal["meta", "google"]


@dataclass(frozen=True)
class PlatformRules:
    header: tuple[str, str]
    phone_plus: bool  # E.164 with its leading '+', or digits only


PLATFORMS: dict[str, PlatformRules] = {
    "meta": PlatformRules(header=("email", "phone"), phone_plus=False),
    "google": PlatformRules(header=("Email", "Phone"), phone_plus=True),
}


class AdFilesConfig(BaseModel):
    """Configuration of an ad-platform audience files destination."""

    model_config = {"extra": "forbid"}

    folder: str = Field(
        description="Folder the files are written to: relative paths are under <data_dir>/exports/, absolute "
        "paths are used as they are."
    )
    platform: Platform = Field(
        "meta",
        description="Whose customer-list rules to follow: meta (phones as digits with country code, no '+') or "
        "google (Customer Match: phones in E.164 with '+').",
    )
    default_region: str = Field(
        "US", min_length=2, max_length=2, description="Country (ISO 3166 alpha-2) of phone numbers written without a country code."
    )

    @field_validator("default_region")
    @classmethod
    def _upper(cls, value: str) -> str:
        if not value.isalpha():
            raise ValueError(f"default_region {value!r} is not a two-letter country code. Fix: e.g. US, GB, DE.")
        return value.upper()


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _values(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [str(v) for v in value if v is not None]
    return [str(value)]


def normal_email(raw: str) -> str | None:
    """The email as the platforms hash it, or None when it is not an email."""
    n = normalise("email", raw)
    local, at, domain = n.value.rpartition("@")
    if n.reason is not None or not at or not local or not domain or "@" in local:
        return None
    return n.value


def normal_phone(raw: str, rules: PlatformRules, default_region: str) -> str | None:
    n = normalise("phone", raw, default_region=default_region)
    if n.reason is not None:
        return None
    return n.value if rules.phone_plus else n.value.removeprefix("+")


def hashed_rows(record: Record, rules: PlatformRules, default_region: str) -> list[tuple[str, str]]:
    """(email hash, phone hash) rows of one record; '' where a side has no value."""
    emails = list(dict.fromkeys(e for e in map(normal_email, _values(record.fields.get("email"))) if e))
    phones = list(
        dict.fromkeys(
            p for p in (normal_phone(v, rules, default_region) for v in _values(record.fields.get("phone"))) if p
        )
    )
    return [
        (sha256_hex(e) if e else "", sha256_hex(p) if p else "")
        for e, p in zip_longest(emails, phones, fillvalue=None)
    ]


def _csv(header: tuple[str, str], rows: list[tuple[str, str]]) -> bytes:
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


class AdFilesDestination:
    def __init__(self, config: AdFilesConfig, context: DestinationContext) -> None:
        self.folder = resolve_folder(config.folder, context)
        self.rules = PLATFORMS[config.platform]
        self.platform = config.platform
        self.default_region = config.default_region

    def paths_of(self, batch_id: str) -> dict[str, Any]:
        stem = file_stem(batch_id)
        return {
            "add": self.folder / f"{stem}.add.csv",
            "remove": self.folder / f"{stem}.remove.csv",
            "manifest": self.folder / f"{stem}.manifest.json",
        }

    def deliver(self, batch: Batch) -> None:
        rows: dict[str, list[tuple[str, str]]] = {"add": [], "remove": []}
        skipped: dict[str, list[str]] = {"add": [], "remove": []}
        for record in batch.records:
            found = hashed_rows(record, self.rules, self.default_region)
            if found:
                rows[record.action].extend(found)
            else:
                skipped[record.action].append(record.profile_id)
        paths = self.paths_of(batch.id)
        manifest = {
            "batch_id": batch.id,
            "sync": batch.sync,
            "segment": batch.segment,
            "platform": self.platform,
            "files": {action: paths[action].name for action in ("add", "remove")},
            "rows": {action: len(rows[action]) for action in ("add", "remove")},
            "profiles": {action: len(batch.added if action == "add" else batch.removed) for action in ("add", "remove")},
            # Profile ids only (no personal values): who could not be matched, so nothing vanishes unseen.
            "skipped_no_identifier": skipped,
        }
        try:
            for action in ("add", "remove"):
                write_atomically(paths[action], _csv(self.rules.header, rows[action]))
            write_atomically(paths["manifest"], orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
        except OSError as exc:
            raise delivery_error(exc, self.folder) from None

    def close(self) -> None:
        pass


ADFILES = register(
    DestinationType(
        kind="adfiles",
        config_model=AdFilesConfig,
        factory=AdFilesDestination,
        description="Ad-platform customer lists: SHA-256 of normalised emails and phones, as add and remove CSV files per batch.",
        needs_fields=("email", "phone"),
    )
)
