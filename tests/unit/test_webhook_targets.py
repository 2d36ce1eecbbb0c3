"""The webhook target guard: schemes, credentials, and non-public addresses (SSRF)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import pytest

from services.notifier.targets import (
    IPAddress,
    TargetPolicy,
    TargetRefused,
    check_url,
    is_public,
)
from services.notifier.webhook import WebhookSecrets

NOT_PUBLIC = [
    "10.0.0.1",  # private
    "172.16.5.4",
    "192.168.1.1",
    "127.0.0.1",  # loopback
    "127.8.9.10",
    "169.254.169.254",  # link-local: the cloud metadata service
    "100.64.0.1",  # shared address space (CGNAT)
    "0.0.0.0",  # unspecified
    "224.0.0.1",  # multicast
    "239.255.255.250",
    "240.0.0.1",  # reserved
    "255.255.255.255",
    "192.0.2.10",  # documentation
    "::1",  # IPv6 loopback
    "::",  # unspecified
    "fe80::1",  # link-local
    "fc00::1",  # unique local
    "fd12:3456:789a::1",
    "ff02::1",  # multicast
    "::ffff:127.0.0.1",  # IPv4-mapped loopback
    "::ffff:10.0.0.1",  # IPv4-mapped private
    "::ffff:169.254.169.254",
    "2002:7f00:1::1",  # 6to4 wrapping 127.0.0.1
    "2002:a00:1::1",  # 6to4 wrapping 10.0.0.1
    "2001:db8::1",  # documentation
    "fec0::1",  # site-local (deprecated, reserved)
]
PUBLIC = ["93.184.215.14", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450:4001::1"]


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))
    with pytest.raises(TargetRefused, match="non-public"):
        TargetPolicy().check(address, [ipaddress.ip_address(address)])


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address: str) -> None:
    assert is_public(ipaddress.ip_address(address))
    TargetPolicy().check(address, [ipaddress.ip_address(address)])


@pytest.mark.parametrize(
    "url",
    [
        "ftp://hooks.example.org/x",
        "file:///etc/passwd",
        "gopher://hooks.example.org/",
        "ops@example.org",
        "hooks.example.org/path",
        "javascript:alert(1)",
    ],
)
def test_other_schemes_are_refused(url: str) -> None:
    with pytest.raises(TargetRefused, match="http or https"):
        check_url(url)


@pytest.mark.parametrize(
    "url",
    ["https://user:pass@hooks.example.org/x", "https://token@hooks.example.org/x"],
)
def test_credentials_in_the_url_are_refused(url: str) -> None:
    with pytest.raises(TargetRefused, match="credentials"):
        check_url(url)


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:99999/", "http://a b/", "https://hooks.example.org:0/in", "http://x/\x7f"],
)
def test_a_url_nothing_could_ever_answer_is_refused_not_retried(url: str) -> None:
    # httpx took these: a connect error each time, retried as transient until the last tier.
    with pytest.raises(TargetRefused):
        check_url(url)


def test_a_space_in_the_path_or_query_is_escaped_not_refused() -> None:
    # Delivered so since webhooks exist: refused for good, such a notification (or one already
    # queued) would be dead-lettered at once, and again at every replay.
    url = check_url("https://hooks.example.org/in box?name=Q3 report")
    assert url.raw_path == b"/in%20box?name=Q3%20report"


def test_a_plain_https_url_is_accepted() -> None:
    url = check_url("https://Hooks.Example.org:8443/in?x=1")
    assert (url.host, url.port, url.path) == ("hooks.example.org", 8443, "/in")


@pytest.mark.parametrize("url", ["https://xn--ls8h.la/in", "http://xn--a.com/"])
def test_an_a_label_idna_will_not_decode_is_posted_as_dns_has_it(url: str) -> None:
    # httpx's `host` raised idna's error for these (a 500 at the gateway's upload).
    assert check_url(url).raw_host == url.split("/")[2].encode()


@pytest.mark.parametrize(
    ("configured", "url"),
    [
        (configured, url)
        for configured in ("bücher.de", "xn--bcher-kva.de", "XN--BCHER-KVA.DE")
        for url in ("https://bücher.de/in", "https://xn--bcher-kva.de/in")
    ]
    + [
        ("💩.la", "https://xn--ls8h.la/in"),  # IDNA 2008 refuses the emoji; IDNA 2003 encodes it
        ("2001:db8::1", "https://[2001:0DB8:0::1]:8443/in"),
        ("[2001:db8::1]", "https://[2001:db8::1]/in"),
        # A fully qualified name (a trailing dot) is the same host to DNS, TLS and HTTP.
        ("hooks.example.com", "https://hooks.example.com./in"),
        ("hooks.example.com.", "https://hooks.example.com/in"),
    ],
)
def test_a_hosts_secret_is_found_however_either_side_spells_it(configured: str, url: str) -> None:
    secrets = WebhookSecrets(None, {configured: b"s" * 32})
    assert secrets.for_host(check_url(url).raw_host) == b"s" * 32
    assert secrets.for_host("other.example") is None


class FakeDns:
    def __init__(self, answers: dict[str, Sequence[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[IPAddress]:
        self.asked.append(host)
        return [ipaddress.ip_address(a) for a in self.answers.get(host, ())]


async def refused_addresses(
    host: str, dns: FakeDns, caplog: pytest.LogCaptureFixture
) -> tuple[str, list[str]]:
    """The refusal's text, and the addresses the log named for it."""
    with pytest.raises(TargetRefused) as refused:
        await TargetPolicy().addresses(host, 443, dns)
    named = [r.addresses for r in caplog.records if r.getMessage() == "webhook target refused"]  # type: ignore[attr-defined]
    return str(refused.value), [a for addresses in named for a in addresses]


async def test_a_name_resolving_to_a_private_address_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dns = FakeDns({"internal.example.org": ["10.1.2.3"]})
    text, logged = await refused_addresses("internal.example.org", dns, caplog)
    assert "internal.example.org resolves to a non-public address" in text
    assert logged == ["10.1.2.3"]


async def test_every_resolved_address_must_pass(caplog: pytest.LogCaptureFixture) -> None:
    dns = FakeDns({"mixed.example.org": ["93.184.215.14", "127.0.0.1"]})
    _, logged = await refused_addresses("mixed.example.org", dns, caplog)
    assert logged == ["127.0.0.1"]


async def test_a_name_resolving_to_an_ipv6_loopback_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dns = FakeDns({"v6.example.org": ["2606:4700:4700::1111", "::1"]})
    _, logged = await refused_addresses("v6.example.org", dns, caplog)
    assert logged == ["::1"]


async def test_a_refusal_does_not_say_what_the_name_resolved_to(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Its text reaches the event's public status and its callback: it told anyone who may
    # submit an event what the notifier's DNS holds for internal names. The log keeps it.
    dns = FakeDns({"internal-db.lan": ["10.20.30.40"]})
    text, _ = await refused_addresses("internal-db.lan", dns, caplog)
    assert "10.20.30.40" not in text


async def test_a_name_resolving_to_nothing_is_refused() -> None:
    with pytest.raises(TargetRefused, match="no address"):
        await TargetPolicy().addresses("void.example.org", 443, FakeDns({}))


async def test_a_public_name_yields_its_checked_addresses() -> None:
    dns = FakeDns({"hooks.example.org": ["93.184.215.14", "2606:4700:4700::1111"]})
    found = await TargetPolicy().addresses("hooks.example.org", 443, dns)
    assert [str(a) for a in found] == ["93.184.215.14", "2606:4700:4700::1111"]


async def test_an_ip_literal_is_checked_without_resolving() -> None:
    dns = FakeDns({})
    with pytest.raises(TargetRefused):
        await TargetPolicy().addresses("169.254.169.254", 80, dns)
    with pytest.raises(TargetRefused):
        await TargetPolicy().addresses("[::1]", 80, dns)
    assert dns.asked == []


async def test_the_real_resolver_refuses_localhost() -> None:
    with pytest.raises(TargetRefused, match="non-public"):
        await TargetPolicy().addresses("localhost", 80)


async def test_allow_listed_addresses_networks_and_hosts_pass() -> None:
    policy = TargetPolicy.from_entries(["127.0.0.1", "10.20.0.0/16", "Hooks.Internal", "fd00::/8"])
    dns = FakeDns({"hooks.internal": ["192.168.9.9"], "other.internal": ["10.20.3.4", "fd00::5"]})
    assert [str(a) for a in await policy.addresses("127.0.0.1", 80, dns)] == ["127.0.0.1"]
    await policy.addresses("hooks.internal", 80, dns)  # allowed by name
    await policy.addresses("other.internal", 80, dns)  # every address in an allowed network
    with pytest.raises(TargetRefused):
        await policy.addresses("127.0.0.2", 80, dns)
    with pytest.raises(TargetRefused):
        await policy.addresses("10.21.0.1", 80, dns)


@pytest.mark.parametrize("entry", ["not a host", "10.0.0.0/33", "http://x.example.org", "a/b"])
def test_unreadable_allow_list_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="not a host name"):
        TargetPolicy.from_entries([entry])
