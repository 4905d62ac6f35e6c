"""Generated person records with known truth: duplicates with typos, missing values and reformatting, and namesakes.

A plain module, not a conftest.py: tests/identity/conftest.py is imported as `conftest` by its tests, and a
second conftest here would shadow it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pyarrow as pa

FIRST = ["olivia", "liam", "emma", "noah", "amelia", "oliver", "sophia", "elijah", "isabella", "james",
         "charlotte", "william", "mia", "benjamin", "evelyn", "lucas", "harper", "henry", "camila", "theodore",
         "gianna", "jack", "abigail", "levi", "luna", "alexander", "ella", "jackson", "elizabeth", "mateo",
         "sofia", "daniel", "emily", "michael", "avery", "mason", "mila", "sebastian", "scarlett", "ethan"]  # fmt: skip
LAST = ["smith", "johnson", "williams", "brown", "jones", "garcia", "miller", "davis", "rodriguez", "martinez",
        "hernandez", "lopez", "gonzalez", "wilson", "anderson", "thomas", "taylor", "moore", "jackson", "martin",
        "lee", "perez", "thompson", "white", "harris", "sanchez", "clark", "ramirez", "lewis", "robinson",
        "walker", "young", "allen", "king", "wright", "scott", "torres", "nguyen", "hill", "flores"]  # fmt: skip
STREETS = ["high street", "station road", "church lane", "park avenue", "mill road", "victoria street", "green lane",
           "manor road", "kings road", "queens avenue", "london road", "the crescent", "north street", "west way"]  # fmt: skip
CITIES = ["springfield", "riverton", "lakeside", "fairview", "greenville", "madison", "oakridge", "kingston",
          "ashford", "brookfield", "clifton", "dover"]  # fmt: skip


def typo(rng: random.Random, s: str) -> str:
    i = rng.randrange(1, len(s) - 1)
    kind = rng.choice(["swap", "sub", "drop"])
    if kind == "swap":
        return s[:i] + s[i + 1] + s[i] + s[i + 2 :]
    if kind == "sub":
        return s[:i] + rng.choice("aeiourstn") + s[i + 1 :]
    return s[:i] + s[i + 1 :]


@dataclass
class PersonRecords:
    table: pa.Table
    truth: set[frozenset[str]]  # pairs of crm ids that are the same person
    namesakes: set[frozenset[str]]  # pairs of crm ids: same name, different people
    noise: dict[str, list[str]] = field(default_factory=dict)  # crm id -> what was done to it


def make_person_records(seed: int = 3, people: int = 120) -> PersonRecords:
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    truth: set[frozenset[str]] = set()
    namesakes: set[frozenset[str]] = set()
    noise: dict[str, list[str]] = {}
    persons = []
    for p in range(people):
        persons.append(
            {
                "first_name": rng.choice(FIRST),
                "last_name": rng.choice(LAST),
                "dob": f"{rng.randint(1940, 2004)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                "address": f"{rng.randint(1, 250)} {rng.choice(STREETS)}",
                "city": rng.choice(CITIES),
                "postcode": f"{rng.randint(10000, 99999)}",
                "email": f"p{p}.{rng.randint(100, 999)}@example.com",
                "phone": f"+44 7700 {rng.randint(100000, 999999)}",
            }
        )
    # Namesakes: a few people share a name (and a city) with someone else and nothing more.
    for p in range(0, 20, 4):
        twin = persons[p + 1]
        twin["first_name"], twin["last_name"], twin["city"] = persons[p]["first_name"], persons[p]["last_name"], persons[p]["city"]

    def add(pid: int, crm: str, rec: dict[str, object], done: list[str]) -> None:
        rows.append({"record_id": f"r{len(rows)}", "id_type": "crm_id", "id_value": crm, **rec})
        noise[crm] = done

    for pid, person in enumerate(persons):
        crm = f"C-{pid:04d}"
        add(pid, crm, dict(person), [])
        if rng.random() < 0.65:  # entered again under another customer id, with the usual damage
            rec = dict(person)
            done = []
            for fld in rng.sample(["first_name", "last_name", "email", "phone", "address", "dob", "missing", "format"], 2):
                if fld in ("first_name", "last_name"):
                    rec[fld] = typo(rng, str(rec[fld]))
                elif fld == "email" and rec["email"] is not None:
                    rec["email"] = "  " + str(rec["email"]).upper()
                elif fld == "phone" and rec["phone"] is not None:
                    rec["phone"] = "07700" + str(rec["phone"])[-6:]
                elif fld == "address" and rec["address"] is not None:
                    rec["address"] = str(rec["address"]).replace("street", "st").replace("road", "rd") + " "
                elif fld == "dob" and rec["dob"] is not None:
                    y, m, d = str(rec["dob"]).split("-")
                    rec["dob"] = f"{y}-{m}-{int(d) % 28 + 1:02d}"  # the day mistyped
                elif fld == "missing":
                    for gone in rng.sample(["email", "phone", "dob", "address"], 2):
                        rec[gone] = None
                elif fld == "format":
                    rec["first_name"] = str(rec["first_name"]).title()
                done.append(fld)
            dup = f"D-{pid:04d}"
            add(pid, dup, rec, done)
            truth.add(frozenset((crm, dup)))
    for p in range(0, 20, 4):
        namesakes.add(frozenset((f"C-{p:04d}", f"C-{p + 1:04d}")))
    # Exported twice under the same customer id (a self-pair: never a link).
    again = dict(rows[0])
    again["record_id"] = f"r{len(rows)}"
    rows.append(again)
    return PersonRecords(pa.Table.from_pylist(rows), truth, namesakes, noise)
