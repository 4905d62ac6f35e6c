"""The fixed vocabulary the demo world draws from: names, places, products, user agents.

Plain data, no logic. Domains are the reserved `example.*` ones and phone numbers come from ranges
set aside for fiction, so nothing generated can belong to a real person.
"""

from __future__ import annotations

FIRST_NAMES: tuple[str, ...] = (
    "Olivia", "Liam", "Emma", "Noah", "Amelia", "Oliver", "Ava", "Elijah", "Sophia", "Lucas", "Isla", "Mateo",
    "Mia", "Leo", "Freya", "Arjun", "Chloe", "Hugo", "Lena", "Jonas", "Sofia", "Finn", "Zoe", "Ethan", "Maya",
    "Samuel", "Grace", "Theo", "Nora", "Felix", "Aisha", "Omar", "Hannah", "Jack", "Ella", "Ruby", "Yusuf",
    "Clara", "Louis", "Ines", "Max", "Anna", "Daniel", "Priya", "Tom", "Julia", "Ben", "Lucy", "Marta", "Jon",
)
LAST_NAMES: tuple[str, ...] = (
    "Smith", "Jones", "Taylor", "Brown", "Williams", "Wilson", "Johnson", "Davies", "Patel", "Wright", "Martin",
    "Müller", "Schmidt", "Schneider", "Fischer", "Weber", "Meyer", "Dubois", "Moreau", "Laurent", "Bernard",
    "de Vries", "Jansen", "Bakker", "Visser", "Garcia", "Rossi", "Novak", "Kowalski", "Nguyen", "O'Brien",
    "Murphy", "Kelly", "Walsh", "Evans", "Thomas", "Roberts", "Khan", "Ali", "Hughes",
)
EMAIL_DOMAINS: tuple[str, ...] = ("example.com", "example.net", "example.org", "mail.example", "inbox.example")

#: country -> (currency, locale, cities, phone prefix, national trunk prefix)
COUNTRIES: dict[str, tuple[str, str, tuple[str, ...], str, str]] = {
    "GB": ("GBP", "en-GB", ("London", "Manchester", "Leeds", "Bristol", "Glasgow"), "+44", "0"),
    "US": ("USD", "en-US", ("New York", "Austin", "Seattle", "Chicago", "Denver"), "+1", ""),
    "DE": ("EUR", "de-DE", ("Berlin", "Hamburg", "München", "Köln", "Leipzig"), "+49", "0"),
    "FR": ("EUR", "fr-FR", ("Paris", "Lyon", "Marseille", "Lille", "Nantes"), "+33", "0"),
    "NL": ("EUR", "nl-NL", ("Amsterdam", "Rotterdam", "Utrecht", "Eindhoven", "Groningen"), "+31", "0"),
}
COUNTRY_WEIGHTS: tuple[float, ...] = (0.35, 0.25, 0.15, 0.15, 0.10)

#: (product_id, name, category, price in the shop's base unit)
PRODUCTS: tuple[tuple[str, str, str, float], ...] = (
    ("sku-1001", "Trail Runner 2", "Shoes", 119.0),
    ("sku-1002", "City Sneaker", "Shoes", 89.0),
    ("sku-1003", "Merino Hiking Sock", "Shoes", 19.5),
    ("sku-2001", "Rain Shell Jacket", "Outerwear", 189.0),
    ("sku-2002", "Down Vest", "Outerwear", 139.0),
    ("sku-2003", "Fleece Hoodie", "Outerwear", 79.0),
    ("sku-3001", "Canvas Backpack 20L", "Accessories", 69.0),
    ("sku-3002", "Leather Belt", "Accessories", 45.0),
    ("sku-3003", "Wool Beanie", "Accessories", 25.0),
    ("sku-4001", "Ceramic Pour-Over Set", "Home", 54.0),
    ("sku-4002", "Linen Throw", "Home", 99.0),
    ("sku-5001", "Wireless Earbuds", "Electronics", 149.0),
    ("sku-5002", "Solar Power Bank", "Electronics", 59.0),
    ("sku-5003", "Smart Bottle", "Electronics", 39.0),
)

PLANS: tuple[tuple[str, float], ...] = (("Starter", 0.0), ("Plus", 9.0), ("Pro", 29.0))
BLOG_POSTS: tuple[str, ...] = ("packing-light", "care-for-merino", "trail-guide-alps", "rain-gear-101", "gift-ideas")
REFERRERS: tuple[str, ...] = (
    "", "", "", "https://www.google.com/", "https://duckduckgo.com/", "https://www.instagram.com/",
    "https://news.example/article/42", "https://newsletter.example/issue/7",
)

WEB_USER_AGENTS: dict[str, tuple[str, ...]] = {
    "desktop": (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Safari/605.1.15",
        "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36 Edg/124.0.0.0",
    ),
    "tablet": (
        "Mozilla/5.0 (iPad; CPU OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
        "Mozilla/5.0 (Linux; Android 14; SM-X710) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36",
    ),
    "mobile": (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
        "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Mobile Safari/537.36",
        "Mozilla/5.0 (Linux; Android 13; SM-S911B) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/123.0.0.0 Mobile Safari/537.36",
    ),
}

#: (os name, os version, manufacturer, model, device type)
APP_DEVICES: tuple[tuple[str, str, str, str, str], ...] = (
    ("iOS", "17.4", "Apple", "iPhone15,2", "ios"),
    ("iOS", "16.7", "Apple", "iPhone13,1", "ios"),
    ("Android", "14", "Google", "Pixel 8", "android"),
    ("Android", "13", "Samsung", "SM-S911B", "android"),
)
APP_VERSION = ("4.12.0", "412")

#: Reserved documentation address blocks (RFC 5737), so demo IPs never point at anyone.
IP_BLOCKS: tuple[str, ...] = ("192.0.2", "198.51.100", "203.0.113")

PURPOSES: tuple[str, ...] = ("analytics", "personalisation", "marketing", "advertising")
#: How likely a person is to grant each purpose: the choices differ by purpose on purpose.
PURPOSE_GRANT_RATE: dict[str, float] = {"analytics": 0.85, "personalisation": 0.6, "marketing": 0.4, "advertising": 0.3}
