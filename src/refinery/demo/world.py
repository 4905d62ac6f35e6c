"""The demo world: a pure, seeded generator of people, their devices and what they do.

`generate(people, seed, now)` returns the same `World` for the same arguments: households whose
members share a family device, people who browse anonymously on several devices (one anonymous id
per cookie or app install, a new one when cookies are cleared) and later sign up or log in,
people who change their email, purchases and funnels, consent that differs by purpose, a few
deliberately bad events, and a CRM export (see `refinery.demo.crm`). Nothing here does I/O: the
caller sends the events and writes the files (`refinery.demo.run`).
"""

from __future__ import annotations

import random
import unicodedata
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from refinery.demo import catalogue as cat
from refinery.errors import ConfigurationError

WEB_SOURCE = "demo-web"
APP_SOURCE = "demo-app"
CRM_SOURCE = "demo-crm"
DAYS = 60

#: Reasons the collector gives the deliberately bad events (see `_bad_events`).
FUTURE_REASON = "timestamp_in_future"
TOO_OLD_REASON = "timestamp_too_old"
CLEAN = "clean"


#: US area codes the demo's fictional 555-01xx numbers are spread over.
_US_AREA_CODES: tuple[str, ...] = (
    "202", "206", "212", "213", "214", "305", "310", "312", "404", "415", "503", "512", "602", "617", "702", "713",
    "720", "801", "818", "860", "904", "919", "949", "971",
)

@dataclass
class Device:
    """A physical device. Web devices carry a cookie (anonymous id) per browser profile; apps an install id."""

    key: str                       # the ground truth's name for it, e.g. "dev-0007"
    kind: str                      # desktop | tablet | mobile (browsers) | app
    source: str
    anonymous_ids: list[str]       # the second one appears after cookies are cleared
    ip: str
    user_agent: str | None = None
    device_id: str | None = None   # app installs only (context.device.id)
    advertising_id: str | None = None
    app_device: tuple[str, str, str, str, str] | None = None
    household_id: str | None = None
    shared: bool = False           # a family device several people use
    cookie_reset_at: datetime | None = None
    consent: dict[str, bool] | None = None  # shared devices: the banner choice stored in their cookie


@dataclass
class Person:
    person_id: str
    household_id: str
    first_name: str
    last_name: str
    country: str
    city: str
    locale: str
    currency: str
    emails: list[str]              # in order; a second one after an email change
    phone: str | None
    user_id: str | None            # None: never signs up
    devices: list[str] = field(default_factory=list)
    consent_history: list[tuple[datetime, dict[str, bool]]] = field(default_factory=list)
    email_changed_at: datetime | None = None
    signed_up_at: datetime | None = None

    def consent_at(self, t: datetime) -> dict[str, bool]:
        current = self.consent_history[0][1]
        for at, prefs in self.consent_history:
            if at <= t:
                current = prefs
        return current

    def email_at(self, t: datetime) -> str:
        if self.email_changed_at is not None and t >= self.email_changed_at:
            return self.emails[-1]
        return self.emails[0]


@dataclass(frozen=True)
class DemoEvent:
    """One call as the SDK sends it (Segment field names), with who made it and what should happen to it."""

    source: str
    person_id: str
    device_key: str
    message: dict[str, Any]        # type, messageId, timestamp (datetime), userId, anonymousId, ...
    expected: str = CLEAN          # "clean", or the failed_events reason it must get

    @property
    def message_id(self) -> str:
        return str(self.message["messageId"])

    @property
    def timestamp(self) -> datetime:
        ts: datetime = self.message["timestamp"]
        return ts


@dataclass(frozen=True)
class CrmRow:
    values: dict[str, str]         # column -> cell text ("" when missing)
    person_id: str
    issues: tuple[str, ...]        # what was done to the row: name_typo, email_typo, missing_phone, ...
    expected: str                  # "loaded", "duplicate_row" (same id as an earlier row), or "missing_id"


@dataclass
class World:
    seed: int
    size: int
    now: datetime
    people: list[Person]
    devices: dict[str, Device]
    events: list[DemoEvent]
    crm_rows: list[CrmRow]

    def person(self, person_id: str) -> Person:
        return next(p for p in self.people if p.person_id == person_id)

    def expected_counts(self, exclude_person: str | None = None) -> dict[str, int]:
        """How many events each outcome should get, from the world itself (what tests compare with),
        leaving out one person's (an erased person's events are not stored)."""
        counts: dict[str, int] = {}
        for e in self.events:
            if exclude_person is not None and e.person_id == exclude_person:
                continue
            counts[e.expected] = counts.get(e.expected, 0) + 1
        return counts


def generate(people: int = 200, seed: int = 7, now: datetime | None = None) -> World:
    """The world for `seed` with `people` people, whose activity ends just before `now`."""
    if people < 2:
        raise ConfigurationError(f"--people {people} is too small for the demo world.", fix="Use at least 2 people.", field="people")
    anchor = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    rng = random.Random(f"refinery-demo:{seed}")
    builder = _Builder(rng, anchor)
    builder.populate(people)
    for person in builder.people:
        builder.live(person)
    builder.guarantee_shared_device_use()
    events = builder.events + builder.bad_events()
    events.sort(key=lambda e: e.timestamp)
    from refinery.demo.crm import crm_export

    world = World(seed, people, anchor, builder.people, builder.devices, events, [])
    world.crm_rows = crm_export(world, random.Random(f"refinery-demo-crm:{seed}"))
    return world


# --- building -------------------------------------------------------------------------------

def _ascii(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return "".join(ch for ch in folded.lower() if ch.isalnum())


class _Builder:
    def __init__(self, rng: random.Random, now: datetime):
        self.rng = rng
        self.now = now
        self.start = now - timedelta(days=DAYS)
        self.people: list[Person] = []
        self.devices: dict[str, Device] = {}
        self.events: list[DemoEvent] = []
        self._emails: set[str] = set()
        self._phones: set[str] = set()
        self._ids: set[str] = set()

    # identifiers ---------------------------------------------------------------------------
    def uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def token(self, prefix: str, length: int = 10) -> str:
        alphabet = "abcdefghijkmnopqrstuvwxyz23456789"
        while True:
            value = prefix + "".join(self.rng.choice(alphabet) for _ in range(length))
            if value not in self._ids:
                self._ids.add(value)
                return value

    def ip(self) -> str:
        return f"{self.rng.choice(cat.IP_BLOCKS)}.{self.rng.randint(1, 254)}"

    def email(self, first: str, last: str) -> str:
        f, l_ = _ascii(first), _ascii(last)
        patterns = (f"{f}.{l_}", f"{f}{l_}", f"{f[0]}.{l_}", f"{f}_{l_}", f"{l_}.{f}")
        domain = self.rng.choice(cat.EMAIL_DOMAINS)
        local = self.rng.choice(patterns)
        candidate = f"{local}@{domain}"
        n = 1
        while candidate in self._emails:
            n += 1
            candidate = f"{local}{n if n > 1 else ''}{self.rng.randint(1, 99)}@{domain}"
        self._emails.add(candidate)
        return candidate

    def phone(self, country: str) -> str:
        """A number from the ranges reserved for fiction where they exist, unique in the world: people
        do not share phone numbers here (a shared number would be a true identity collision, and the
        ground truth would then hold two people under one identifier by accident)."""
        for attempt in range(64):
            candidate = self._phone_candidate(country, wide=attempt >= 16)
            if candidate not in self._phones:
                self._phones.add(candidate)
                return candidate
        raise RuntimeError("phone numbers exhausted")  # pragma: no cover - 10^4 per area code

    def _phone_candidate(self, country: str, *, wide: bool) -> str:
        prefix = cat.COUNTRIES[country][3]
        if country == "GB":  # Ofcom's drama range 07700 900000-900999, then the rest of 07700 9xxxxx
            return f"{prefix}77009{self.rng.randint(0, 99999):05d}" if wide else f"{prefix}7700900{self.rng.randint(0, 999):03d}"
        if country == "US":  # 555-0100..0199 is reserved for fiction in every area code
            area = self.rng.choice(_US_AREA_CODES)
            return f"{prefix}{area}555{self.rng.randint(0, 9999):04d}" if wide else f"{prefix}{area}5550{self.rng.randint(100, 199)}"
        if country == "FR":  # ARCEP's range for fiction, 01 99 00 xx xx, then mobiles 06 xx xx xx xx
            return f"{prefix}6{self.rng.randint(0, 99999999):08d}" if wide else f"{prefix}19900{self.rng.randint(0, 9999):04d}"
        if country == "NL":  # mobiles, 06 xxxxxxxx
            return f"{prefix}6{self.rng.randint(10000000, 99999999)}"
        return f"{prefix}15{self.rng.randint(10, 99)}{self.rng.randint(1000000, 9999999)}"

    def consent(self) -> dict[str, bool]:
        return {p: self.rng.random() < cat.PURPOSE_GRANT_RATE[p] for p in cat.PURPOSES}

    # population ----------------------------------------------------------------------------
    def populate(self, n: int) -> None:
        i = 0
        h = 0
        while i < n:
            h += 1
            size = 2 if h == 1 else self.rng.choices((1, 2, 3, 4), (0.55, 0.27, 0.12, 0.06))[0]
            size = min(size, n - i)
            household = f"hh-{h:04d}"
            country = self.rng.choices(tuple(cat.COUNTRIES), cat.COUNTRY_WEIGHTS)[0]
            city = self.rng.choice(cat.COUNTRIES[country][2])
            home_ip = self.ip()
            family_name = self.rng.choice(cat.LAST_NAMES)
            members = [self.person(i + k, household, country, city, family_name) for k in range(size)]
            i += size
            # The first household always shares a device, so every world shows one.
            if size >= 2 and (h == 1 or self.rng.random() < 0.6):
                kind = self.rng.choice(("desktop", "tablet"))
                dev = self.web_device(kind, home_ip, household)
                dev.shared = True
                dev.consent = self.consent()
                for m in members:
                    m.devices.append(dev.key)
            for m in members:
                self.personal_devices(m, home_ip)
            self.people.extend(members)

    def person(self, index: int, household: str, country: str, city: str, family_name: str) -> Person:
        currency, locale, *_ = cat.COUNTRIES[country]
        first = self.rng.choice(cat.FIRST_NAMES)
        last = family_name if self.rng.random() < 0.7 else self.rng.choice(cat.LAST_NAMES)
        person = Person(
            person_id=f"person-{index + 1:05d}",
            household_id=household,
            first_name=first,
            last_name=last,
            country=country,
            city=city,
            locale=locale,
            currency=currency,
            emails=[self.email(first, last)],
            phone=self.phone(country) if self.rng.random() < 0.7 else None,
            user_id=self.token("usr_") if (index < 2 or self.rng.random() < 0.78) else None,
        )
        first_consent = self.consent()
        person.consent_history.append((self.start - timedelta(days=1), first_consent))
        if self.rng.random() < 0.12:  # changes their mind later about one purpose
            changed = dict(first_consent)
            purpose = self.rng.choice(("marketing", "advertising", "personalisation"))
            changed[purpose] = not changed[purpose]
            person.consent_history.append((self.start + timedelta(days=self.rng.uniform(10, DAYS - 5)), changed))
        return person

    def web_device(self, kind: str, ip: str, household: str | None) -> Device:
        key = f"dev-{len(self.devices) + 1:05d}"
        dev = Device(key, kind, WEB_SOURCE, [self.uuid()], ip, user_agent=self.rng.choice(cat.WEB_USER_AGENTS[kind]), household_id=household)
        if kind != "tablet" and self.rng.random() < 0.15:  # cookies cleared: a second anonymous id
            dev.anonymous_ids.append(self.uuid())
            dev.cookie_reset_at = self.start + timedelta(days=self.rng.uniform(5, DAYS - 5))
        self.devices[key] = dev
        return dev

    def personal_devices(self, person: Person, home_ip: str) -> None:
        kinds = ["mobile" if self.rng.random() < 0.55 else "desktop"]
        if self.rng.random() < 0.45:
            kinds.append("app")
        if self.rng.random() < 0.25:
            kinds.append("desktop" if kinds[0] == "mobile" else "mobile")
        for kind in kinds:
            if kind == "app":
                key = f"dev-{len(self.devices) + 1:05d}"
                spec = self.rng.choice(cat.APP_DEVICES)
                self.devices[key] = Device(
                    key, "app", APP_SOURCE, [self.uuid()], self.ip(), device_id=self.uuid().upper() if spec[4] == "ios" else self.token("", 16),
                    advertising_id=self.uuid(), app_device=spec,
                )
            else:
                key = self.web_device(kind, home_ip if kind == "desktop" else self.ip(), None).key
            person.devices.append(key)

    # behaviour -----------------------------------------------------------------------------
    def live(self, person: Person) -> None:
        rng = self.rng
        begin = self.start + timedelta(days=rng.uniform(0, DAYS - 3))
        n = 1 + min(int(rng.expovariate(1 / 4)), 14)
        forced = person.person_id in ("person-00001", "person-00002")
        if forced:
            n = max(n, 3)
        end = self.now - timedelta(minutes=30)
        times = sorted(begin + (end - begin) * rng.random() for _ in range(n))
        personal = [d for d in person.devices if not self.devices[d].shared]
        shared = [d for d in person.devices if self.devices[d].shared]
        plan = [rng.choices(personal, [3] + [1] * (len(personal) - 1))[0] for _ in times]
        if shared:
            plan = [shared[0] if rng.random() < 0.3 else d for d in plan]
            if shared[0] not in plan or forced:
                plan[-1] = shared[0]
        signup_index = None
        if person.user_id is not None:
            signup_index = 0 if forced else rng.randrange(n)
        if forced and person.person_id == "person-00001" and person.user_id:
            person.emails.append(self.email(person.first_name, person.last_name))
            person.email_changed_at = times[-2] + (times[-1] - times[-2]) / 2
        elif person.user_id and signup_index is not None and signup_index < n - 1 and rng.random() < 0.15:
            person.emails.append(self.email(person.first_name, person.last_name))
            person.email_changed_at = times[signup_index] + (end - times[signup_index]) * rng.uniform(0.2, 0.9)

        logged_in: set[tuple[str, str]] = set()  # (device, anonymous id) where this person stays logged in
        last_email: str | None = None
        for i, (t, dev_key) in enumerate(zip(times, plan, strict=True)):
            dev = self.devices[dev_key]
            s = _Session(self, person, dev, t)
            session_key = (dev.key, s.anonymous_id)
            s.landing()
            if signup_index is not None and i == signup_index:
                person.signed_up_at = s.t
                s.sign_up()
                last_email = person.email_at(s.t)
                if not dev.shared:
                    logged_in.add(session_key)
            elif signup_index is not None and i > signup_index:
                if session_key in logged_in:
                    s.user_id = person.user_id
                    email_now = person.email_at(s.t)
                    if email_now != last_email or rng.random() < 0.3:  # apps re-identify on open
                        s.identify()
                        last_email = email_now
                elif forced or rng.random() < (0.8 if dev.shared else 0.75):
                    s.log_in()
                    last_email = person.email_at(s.t)
                    if not dev.shared:
                        logged_in.add(session_key)
            s.browse()
            self.events.extend(s.events)

    def guarantee_shared_device_use(self) -> None:
        """Every shared device must really be used by two or more people, or it is not shared."""
        users: dict[str, set[str]] = {}
        for e in self.events:
            users.setdefault(e.device_key, set()).add(e.person_id)
        for dev in self.devices.values():
            if dev.shared and len(users.get(dev.key, ())) < 2:
                dev.shared = False

    def bad_events(self) -> list[DemoEvent]:
        """A few events the collector must quarantine: a client clock far ahead, one reset to 1970."""
        picks = self.rng.sample(self.events, k=min(3, len(self.events)))
        stamps = (
            (self.now + timedelta(days=400), FUTURE_REASON),
            (self.now + timedelta(days=3650), FUTURE_REASON),
            (datetime(1970, 1, 1, 0, 0, 42, tzinfo=UTC), TOO_OLD_REASON),
        )
        bad = []
        for base, (ts, reason) in zip(picks, stamps, strict=False):
            message = _copy(base.message)
            message["messageId"] = self.uuid()
            message["timestamp"] = ts
            bad.append(DemoEvent(base.source, base.person_id, base.device_key, message, reason))
        return bad


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


class _Session:
    """One visit on one device: page views, funnel steps, maybe a sign-up or login."""

    def __init__(self, b: _Builder, person: Person, dev: Device, start: datetime):
        self.b, self.rng, self.person, self.dev, self.t = b, b.rng, person, dev, start
        self.events: list[DemoEvent] = []
        self.user_id: str | None = None
        self.anonymous_id = dev.anonymous_ids[-1] if dev.cookie_reset_at and start >= dev.cookie_reset_at else dev.anonymous_ids[0]
        self.ip = dev.ip if dev.kind == "desktop" or dev.shared else b.ip()
        self.referrer = ""
        self.cart_id = b.uuid()

    # plumbing --------------------------------------------------------------------------------
    def tick(self, low: float = 4, high: float = 120) -> datetime:
        t = min(self.t + timedelta(seconds=self.rng.uniform(low, high)), self.b.now - timedelta(minutes=1))
        self.t = t.replace(microsecond=t.microsecond // 1000 * 1000)  # what the SDK sends: milliseconds
        return self.t

    def context(self, page: dict[str, str] | None = None) -> dict[str, Any]:
        consent = self.dev.consent if self.dev.shared and self.dev.consent else self.person.consent_at(self.t)
        ctx: dict[str, Any] = {
            "ip": self.ip,
            "locale": self.person.locale,
            "consent": {"categoryPreferences": dict(consent)},
        }
        if self.dev.source == APP_SOURCE:
            os_name, os_version, maker, model, dtype = self.dev.app_device or cat.APP_DEVICES[0]
            device: dict[str, Any] = {"id": self.dev.device_id, "manufacturer": maker, "model": model, "type": dtype}
            if consent.get("advertising"):
                device["advertisingId"] = self.dev.advertising_id
                device["adTrackingEnabled"] = True
            ctx.update(
                device=device,
                os={"name": os_name, "version": os_version},
                app={"name": "Refinery Outfitters", "version": cat.APP_VERSION[0], "build": cat.APP_VERSION[1]},
                network={"wifi": self.rng.random() < 0.6},
            )
        else:
            ctx["userAgent"] = self.dev.user_agent
            if page:
                ctx["page"] = page
        return ctx

    def emit(self, call: str, **fields: Any) -> None:
        message: dict[str, Any] = {"type": call, "messageId": self.b.uuid(), "timestamp": self.tick(), "anonymousId": self.anonymous_id}
        if self.user_id:
            message["userId"] = self.user_id
        page = fields.pop("_page", None)
        message["context"] = self.context(page)
        message.update(fields)
        self.events.append(DemoEvent(self.dev.source, self.person.person_id, self.dev.key, message))

    def view(self, path: str, title: str, screen: str) -> None:
        if self.dev.source == APP_SOURCE:
            self.emit("screen", name=screen, properties={"path": path})
            return
        url = f"https://shop.example{path}"
        page = {"path": path, "url": url, "title": title, "referrer": self.referrer, "search": ""}
        self.emit("page", name=title, properties=dict(page), _page=page)
        self.referrer = url

    # behaviour -------------------------------------------------------------------------------
    def landing(self) -> None:
        self.referrer = self.rng.choice(cat.REFERRERS)
        where = self.rng.random()
        if where < 0.4:
            self.view("/", "Home", "Home")
        elif where < 0.6:
            self.view("/pricing", "Pricing", "Membership")
        elif where < 0.75:
            slug = self.rng.choice(cat.BLOG_POSTS)
            self.view(f"/blog/{slug}", f"Blog: {slug.replace('-', ' ')}", "Stories")
        else:
            self.view("/products", "All products", "Catalogue")

    def traits(self, full: bool) -> dict[str, Any]:
        p = self.person
        traits: dict[str, Any] = {"email": p.email_at(self.t)}
        if full:
            traits.update(firstName=p.first_name, lastName=p.last_name, address={"city": p.city, "country": p.country})
            if p.phone:
                traits["phone"] = p.phone
            traits["createdAt"] = self.t.isoformat().replace("+00:00", "Z")
        return traits

    def identify(self, full: bool = False) -> None:
        self.emit("identify", traits=self.traits(full))

    def sign_up(self) -> None:
        self.view("/signup", "Create account", "Sign up")
        self.user_id = self.person.user_id
        plan, _ = self.rng.choice(cat.PLANS)
        self.emit("track", event="Signed Up", properties={"method": self.rng.choice(("email", "google", "apple")), "plan": plan})
        self.identify(full=True)

    def log_in(self) -> None:
        self.view("/login", "Log in", "Log in")
        self.user_id = self.person.user_id
        self.emit("track", event="Signed In", properties={"method": self.rng.choice(("password", "magic_link", "google"))})
        self.identify(full=self.rng.random() < 0.3)

    def product_props(self, product: tuple[str, str, str, float], quantity: int = 1) -> dict[str, Any]:
        pid, name, category, price = product
        return {
            "product_id": pid, "sku": pid.upper(), "name": name, "category": category,
            "price": price, "quantity": quantity, "currency": self.person.currency,
            "url": f"https://shop.example/products/{pid}",
        }

    def browse(self) -> None:
        rng = self.rng
        viewed = []
        for _ in range(rng.randint(0, 4)):
            product = rng.choice(cat.PRODUCTS)
            viewed.append(product)
            self.view(f"/products/{product[0]}", product[1], "Product")
            self.emit("track", event="Product Viewed", properties=self.product_props(product))
        if rng.random() < 0.25:
            self.view("/pricing", "Pricing", "Membership")
        if not viewed or rng.random() > 0.4:
            return
        cart: list[dict[str, Any]] = []
        for product in dict.fromkeys(viewed):
            if rng.random() < 0.7 or not cart:
                qty = rng.choices((1, 2, 3), (0.8, 0.15, 0.05))[0]
                cart.append(self.product_props(product, qty))
                self.emit("track", event="Product Added", properties={**self.product_props(product, qty), "cart_id": self.cart_id})
        if rng.random() > 0.6:
            return
        self.view("/checkout", "Checkout", "Checkout")
        order_id = f"ord-{self.b.token('', 8)}"
        subtotal = round(sum(p["price"] * p["quantity"] for p in cart), 2)
        products = [{k: p[k] for k in ("product_id", "sku", "name", "category", "price", "quantity")} for p in cart]
        self.emit("track", event="Checkout Started", properties={
            "order_id": order_id, "value": subtotal, "revenue": subtotal, "currency": self.person.currency, "products": products,
        })
        if rng.random() > 0.65:
            return
        shipping = 0.0 if subtotal >= 100 else 4.95
        tax = round(subtotal * 0.2 / 1.2, 2)
        top = max(cart, key=lambda p: p["price"] * p["quantity"])["category"]
        self.emit("track", event="Order Completed", properties={
            "order_id": order_id, "checkout_id": self.cart_id, "total": round(subtotal + shipping, 2), "revenue": subtotal,
            "shipping": shipping, "tax": tax, "currency": self.person.currency, "category": top, "products": products,
            **({"coupon": "WELCOME10"} if rng.random() < 0.2 else {}),
        })
        self.view("/checkout/complete", "Thank you", "Order confirmation")
