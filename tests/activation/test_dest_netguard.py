"""The SSRF guard, against real sockets: what it refuses by default, what the allow-list lets
through, redirects re-checked, and connections made to the address it checked (no second lookup)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest

from refinery.activation.destination import DestinationContext, TerminalDeliveryError, TransientDeliveryError
from refinery.activation.netguard import AddressRefused, NetworkGuard, guarded_client, refusal_reason, send
from refinery.activation.receiver import Fault, Receiver
from refinery.activation.webhook import WebhookConfig, WebhookDestination
from refinery.errors import ConfigurationError

SECRET = "a-signing-secret-of-some-length"


@pytest.fixture
def rx() -> Iterator[Receiver]:
    with Receiver(SECRET) as receiver:
        yield receiver


def _hook(url: str, context: DestinationContext) -> WebhookDestination:
    return WebhookDestination(WebhookConfig(url=url, secret=SECRET), context)


def test_loopback_is_refused_without_the_allow_list(rx: Receiver, dest_context, dest_batch) -> None:
    dest = _hook(rx.url, dest_context())
    with pytest.raises(TerminalDeliveryError) as err:
        dest.deliver(dest_batch({"p1": {}}))
    dest.close()
    assert err.value.field == "url"
    assert "loopback" in err.value.message and "127.0.0.1" in err.value.message
    assert "activation_allowed_networks" in (err.value.fix or "")
    assert rx.stats.requests == 0


def test_the_allow_list_lets_loopback_through(rx: Receiver, dest_context, dest_batch) -> None:
    dest = _hook(rx.url, dest_context(("127.0.0.0/8",)))
    dest.deliver(dest_batch({"p1": {}}))
    dest.close()
    assert set(rx.members("vip")) == {"p1"}


def test_a_host_name_resolving_to_loopback_is_refused(rx: Receiver, dest_context, dest_batch) -> None:
    url = f"http://localhost:{rx.port}/hook"
    dest = _hook(url, dest_context())
    with pytest.raises(TerminalDeliveryError) as err:
        dest.deliver(dest_batch({"p1": {}}))
    dest.close()
    assert "localhost" in err.value.message and "loopback" in err.value.message
    assert rx.stats.requests == 0
    # Allowed by its name, the same host works.
    allowed = _hook(url, dest_context(("localhost",)))
    allowed.deliver(dest_batch({"p1": {}}))
    allowed.close()
    assert set(rx.members("vip")) == {"p1"}


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.10", "private"),
        ("[fc00::1]", "private"),
        ("169.254.169.254", "cloud metadata"),
        ("[fd00:ec2::254]", "cloud metadata"),
        ("100.100.100.200", "cloud metadata"),
        ("169.254.10.10", "link-local"),
        ("[fe80::1]", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("[::ffff:127.0.0.1]", "loopback"),
        ("100.64.0.1", "not globally routable"),
    ],
)
def test_internal_addresses_are_refused(host: str, reason: str, dest_context, dest_batch) -> None:
    dest = _hook(f"http://{host}:8080/hook", dest_context())
    with pytest.raises(TerminalDeliveryError) as err:
        dest.deliver(dest_batch({"p1": {}}))
    dest.close()
    assert f"a {reason} address" in err.value.message


def test_metadata_needs_an_entry_naming_it_exactly() -> None:
    broad = NetworkGuard(("169.254.0.0/16", "0.0.0.0/0"))
    with pytest.raises(AddressRefused, match="cloud metadata"):
        broad.resolve("169.254.169.254", 80)
    assert broad.resolve("169.254.1.1", 80) == [ipaddress.ip_address("169.254.1.1")]
    exact = NetworkGuard(("169.254.169.254/32",))
    assert exact.resolve("169.254.169.254", 80) == [ipaddress.ip_address("169.254.169.254")]
    with pytest.raises(AddressRefused, match="cloud metadata"):
        NetworkGuard().check_url("http://metadata.google.internal/computeMetadata/v1/")
    # A name the operator allowed does not open the metadata address it might resolve to.
    rebound = NetworkGuard(("crm.internal",), resolver=lambda host, port: ["169.254.169.254"])
    with pytest.raises(AddressRefused, match="cloud metadata"):
        rebound.resolve("crm.internal", 80)


def test_public_addresses_pass_and_a_name_mixing_public_and_private_is_refused() -> None:
    assert refusal_reason(ipaddress.ip_address("93.184.216.34")) is None
    assert refusal_reason(ipaddress.ip_address("2606:4700::1111")) is None
    mixed = NetworkGuard(resolver=lambda host, port: ["93.184.216.34", "10.1.2.3"])
    with pytest.raises(AddressRefused, match="10.1.2.3"):
        mixed.resolve("example.test", 443)


def test_a_bad_allow_list_entry_is_named() -> None:
    with pytest.raises(ConfigurationError) as err:
        NetworkGuard(("10.0.0.0/8", "not a/network"))
    assert err.value.field == "activation_allowed_networks"


def test_a_redirect_to_a_private_address_is_refused(rx: Receiver, dest_context, dest_batch) -> None:
    with Receiver(SECRET, host="127.0.0.2") as other:
        rx.inject(Fault.redirect(other.url))  # 127.0.0.1 is allowed, 127.0.0.2 is not
        dest = _hook(rx.url, dest_context(("127.0.0.1/32",)))
        with pytest.raises(TerminalDeliveryError) as err:
            dest.deliver(dest_batch({"p1": {}}))
        dest.close()
        assert "127.0.0.2" in err.value.message and "loopback" in err.value.message
        assert other.stats.requests == 0
    rx.inject(Fault.redirect("http://10.20.30.40/hook", status=308))
    dest = _hook(rx.url, dest_context(("127.0.0.1/32",)))
    with pytest.raises(TerminalDeliveryError, match="10.20.30.40"):
        dest.deliver(dest_batch({"p1": {}}))
    dest.close()
    assert rx.members() == {}


def test_an_allowed_307_is_followed_with_the_same_body_and_signature(rx: Receiver, dest_context, dest_batch) -> None:
    with Receiver(SECRET, host="127.0.0.2") as other:
        rx.inject(Fault.redirect(other.url))
        dest = _hook(rx.url, dest_context(("127.0.0.1/32", "127.0.0.2/32")))
        dest.deliver(dest_batch({"p1": {}}))
        dest.close()
        assert set(other.members("vip")) == {"p1"} and other.stats.bad_signatures == 0
        assert other.last_host == f"127.0.0.2:{other.port}"


def test_a_redirect_that_would_drop_the_body_is_terminal(rx: Receiver, dest_context, dest_batch) -> None:
    rx.inject(Fault.redirect(rx.url, status=302))
    dest = _hook(rx.url, dest_context(("127.0.0.1/32",)))
    with pytest.raises(TerminalDeliveryError) as err:
        dest.deliver(dest_batch({"p1": {}}))
    dest.close()
    assert err.value.details["status"] == 302 and err.value.field == "url"


def test_endless_redirects_stop(rx: Receiver, dest_context, dest_batch) -> None:
    rx.inject(*[Fault.redirect(rx.url)] * 10)
    dest = _hook(rx.url, dest_context(("127.0.0.1/32",)))
    with pytest.raises(TerminalDeliveryError, match="redirected more than"):
        dest.deliver(dest_batch({"p1": {}}))
    dest.close()


def test_connects_to_the_checked_address_once_and_keeps_the_host_name(rx: Receiver) -> None:
    """The name is resolved once per connection, by the guard; the socket goes to that address
    (the system resolver knows no `rebind.test`), while the Host header keeps the name."""
    answers: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        # A rebinding DNS server: the first answer is allowed, later ones are not.
        answers.append(host)
        return ["127.0.0.1"] if len(answers) == 1 else ["10.9.9.9"]

    guard = NetworkGuard(("127.0.0.1/32",), resolver=resolver)
    with guarded_client(guard, 2.0) as client:
        response = send(client, guard, client.build_request("POST", f"http://rebind.test:{rx.port}/hook", content=b"{}"))
    assert response.status_code == 401  # reached the receiver, which wants a signature
    assert answers == ["rebind.test"]
    assert rx.last_host == f"rebind.test:{rx.port}"
    # The next connection asks again and gets the rebound, private answer: refused.
    with guarded_client(guard, 2.0) as client, pytest.raises(AddressRefused, match="10.9.9.9"):
        send(client, guard, client.build_request("POST", f"http://rebind.test:{rx.port}/hook", content=b"{}"))


def test_environment_proxies_are_not_used(rx: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://10.0.0.1:3128")
    monkeypatch.setenv("ALL_PROXY", "http://10.0.0.1:3128")
    guard = NetworkGuard(("127.0.0.1/32",))
    with guarded_client(guard, 2.0) as client:
        response = send(client, guard, client.build_request("POST", rx.url, content=b"{}"))
    assert response.status_code == 401



def test_a_name_that_does_not_resolve_is_transient(dest_context, dest_batch) -> None:
    dest = _hook("http://no-such-host.invalid/hook", dest_context())
    with pytest.raises(TransientDeliveryError, match="no-such-host.invalid"):
        dest.deliver(dest_batch({"p1": {}}))
    dest.close()
