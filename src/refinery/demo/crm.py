"""The demo's CRM export: one row per customer, as messy as real ones.

Typos in names and emails, emails in odd case with stray spaces, stale emails of people who have
since changed theirs, phones in national and international formats, missing values, the same
person entered twice under two customer ids, rows exported twice, and a row that lost its id.
Pure: rows come from the world and a seeded `random.Random`.
"""

from __future__ import annotations

import random
from datetime import timedelta
from typing import TYPE_CHECKING

from refinery.demo import catalogue as cat

if TYPE_CHECKING:
    from refinery.demo.world import CrmRow, Person, World

COLUMNS: tuple[str, ...] = (
    "customer_id", "first_name", "last_name", "email", "phone", "city", "country",
    "web_user_id", "marketing_opt_in", "lifetime_value", "updated_at",
)
LOADED, DUPLICATE_ROW, MISSING_ID = "loaded", "duplicate_row", "missing_id"


def crm_export(world: World, rng: random.Random) -> list[CrmRow]:
    """The export's rows in file order; each knows its person, what was done to it and its expected fate."""
    from refinery.demo.world import CrmRow

    spend = _lifetime_value(world)
    ids = iter(rng.sample(range(100_000, 999_999), k=2 * len(world.people) + 10))
    rows: list[CrmRow] = []
    for person in world.people:
        if not (rng.random() < (0.9 if person.user_id else 0.25)):
            continue
        values, issues = _row(person, f"C{next(ids)}", spend, world, rng)
        rows.append(CrmRow(values, person.person_id, issues, LOADED))
        if rng.random() < 0.06:  # entered again by hand, under a new id, with the usual slips
            again, more = _row(person, f"C{next(ids)}", spend, world, rng, sloppy=True)
            rows.append(CrmRow(again, person.person_id, ("duplicate_customer", *more), LOADED))
    if not rows:
        return rows
    _guarantee(rows, world, rng)
    # Exported twice: identical rows, same id.
    for row in rng.sample(rows, k=max(1, len(rows) // 20)):
        rows.append(CrmRow(dict(row.values), row.person_id, ("exported_twice",), DUPLICATE_ROW))
    # A row that lost its id on the way out of the CRM.
    lost = rng.choice(rows)
    rows.append(CrmRow({**lost.values, "customer_id": ""}, lost.person_id, ("missing_customer_id",), MISSING_ID))
    rng.shuffle(rows)
    return rows


def _lifetime_value(world: World) -> dict[str, float]:
    spend: dict[str, float] = {}
    for e in world.events:
        if e.expected == "clean" and e.message.get("event") == "Order Completed":
            spend[e.person_id] = spend.get(e.person_id, 0.0) + float(e.message["properties"]["total"])
    return spend


def _row(
    person: Person, customer_id: str, spend: dict[str, float], world: World, rng: random.Random, *, sloppy: bool = False
) -> tuple[dict[str, str], tuple[str, ...]]:
    issues: list[str] = []
    first, last = person.first_name, person.last_name
    if sloppy or rng.random() < 0.12:
        if rng.random() < 0.5:
            first = _typo(first, rng)
        else:
            last = _typo(last, rng)
        issues.append("name_typo")
    email = person.emails[0] if len(person.emails) > 1 and rng.random() < 0.6 else person.emails[-1]
    if email != person.emails[-1]:
        issues.append("stale_email")
    roll = rng.random()
    if roll < 0.08 or (sloppy and roll < 0.5):
        email = _email_typo(email, rng)
        issues.append("email_typo")
    elif roll < 0.16:
        email = f" {email.upper()}" if rng.random() < 0.3 else f"{email.title()} "
        issues.append("email_formatting")
    elif roll < 0.21:
        email = ""
        issues.append("missing_email")
    phone = _phone_format(person, rng) if person.phone else ""
    if person.phone and rng.random() < 0.2:
        phone = ""
    if not phone:
        issues.append("missing_phone")
    city = person.city if rng.random() > 0.1 else ""
    if not city:
        issues.append("missing_city")
    web_user_id = person.user_id or ""
    if web_user_id and rng.random() < 0.25:
        web_user_id = ""
    if not web_user_id:
        issues.append("missing_web_user_id")
    opt_in = person.consent_at(world.now)["marketing"]
    updated = world.now - timedelta(days=rng.uniform(0.5, 59))
    values = {
        "customer_id": customer_id,
        "first_name": first,
        "last_name": last,
        "email": email,
        "phone": phone,
        "city": city,
        "country": person.country,
        "web_user_id": web_user_id,
        "marketing_opt_in": rng.choice(("yes", "Y", "true")) if opt_in else rng.choice(("no", "N", "false")),
        "lifetime_value": f"{spend.get(person.person_id, 0.0):.2f}",
        "updated_at": updated.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return values, tuple(issues)


def _guarantee(rows: list[CrmRow], world: World, rng: random.Random) -> None:
    """Small worlds still show every kind of mess: a name typo, an email typo, a missing value."""
    from refinery.demo.world import CrmRow

    kinds = {i for r in rows for i in r.issues}
    if "name_typo" not in kinds:
        r = rows[0]
        rows[0] = CrmRow({**r.values, "last_name": _typo(r.values["last_name"], rng)}, r.person_id, (*r.issues, "name_typo"), r.expected)
    if "email_typo" not in kinds:
        i = next((k for k, r in enumerate(rows) if r.values["email"]), None)
        if i is not None:
            r = rows[i]
            rows[i] = CrmRow({**r.values, "email": _email_typo(r.values["email"], rng)}, r.person_id, (*r.issues, "email_typo"), r.expected)
    if "missing_email" not in kinds:
        # The last row whose email is not the one showing a typo.
        j = max(k for k, r in enumerate(rows) if "email_typo" not in r.issues)
        r = rows[j]
        rows[j] = CrmRow({**r.values, "email": ""}, r.person_id, (*r.issues, "missing_email"), r.expected)
    if "duplicate_customer" not in kinds:
        r = rows[len(rows) // 2]
        person = world.person(r.person_id)
        values, issues = _row(person, f"C{rng.randint(1_000_000, 1_999_999)}", _lifetime_value(world), world, rng, sloppy=True)
        rows.append(CrmRow(values, person.person_id, ("duplicate_customer", *issues), LOADED))


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 3:
        return word + word[-1]
    i = rng.randrange(1, len(word) - 1)
    kind = rng.choice(("swap", "drop", "double", "upper"))
    if kind == "swap" and word[i] != word[i + 1]:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == "drop":
        return word[:i] + word[i + 1:]
    if kind == "upper":
        return word.upper()
    return word[:i] + word[i] + word[i:]


def _email_typo(email: str, rng: random.Random) -> str:
    """A slip that really changes the address (a typo that only changes case would not be one)."""
    for _ in range(8):
        typo = _one_email_typo(email, rng)
        if typo.strip().lower() != email.strip().lower():
            return typo
    local, _, domain = email.strip().partition("@")
    return f"{local}{local[-1:]}@{domain}"


def _one_email_typo(email: str, rng: random.Random) -> str:
    local, _, domain = email.strip().partition("@")
    choice = rng.random()
    if choice < 0.4:
        name, _, tld = domain.rpartition(".")
        return f"{local}@{name}.{ {'com': 'con', 'net': 'nte', 'org': 'ogr'}.get(tld, tld + 'e') }".replace(" ", "")
    if choice < 0.7:
        return f"{_typo(local, rng).lower()}@{domain}"
    return f"{local}@{_typo(domain.split('.')[0], rng).lower()}.{domain.split('.', 1)[1] if '.' in domain else 'example'}"


def _phone_format(person: Person, rng: random.Random) -> str:
    """The person's phone as a CRM clerk might type it: E.164, spaced international, or national."""
    phone = person.phone or ""
    prefix, trunk = cat.COUNTRIES[person.country][3], cat.COUNTRIES[person.country][4]
    national = phone[len(prefix):]
    style = rng.random()
    if style < 0.4:
        return phone
    if style < 0.7:
        return f"{prefix} {national[:4]} {national[4:]}"
    return f"{trunk}{national[:4]} {national[4:]}"
