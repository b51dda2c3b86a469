"""k8s.fields parses addresses in C first (inet_pton): it must accept and refuse exactly what
ipaddress does, so a bad address is still one Invalid line naming the field."""

from __future__ import annotations

import ipaddress

import pytest

from ebpfsvc.k8s import fields

CASES = ["198.18.0.1", "0.0.0.0", "255.255.255.255", "01.2.3.4", "1.2.3.04", "1.2.3", "256.1.1.1",
         "1.2.3.4.5", "0x1.2.3.4", "1..2.3", "+1.2.3.4", "\u0661.2.3.4", "1.2.3.4/32", "", "::1",
         "2001:2::5", "2001:2::198.18.0.1", "example.com"]


@pytest.mark.parametrize("text", CASES)
def test_fast_address_parse_agrees_with_ipaddress(text):
    try:
        expected = ipaddress.ip_address(text)
    except ValueError:
        with pytest.raises(ValueError):
            fields.ip_address(text)
    else:
        got = fields.ip_address(text)
        assert got == expected and type(got) is type(expected)


def test_a_bad_endpoint_address_names_its_field():
    with pytest.raises(fields.Invalid) as err:
        fields.parse_ipv4("198.18.0.300", "endpoints[3].addresses[0]")
    assert err.value.field == "endpoints[3].addresses[0]"


def test_timestamps_in_the_api_servers_form_are_read_as_every_other():
    # parse_timestamp takes "YYYY-MM-DDTHH:MM:SSZ" as it is, once it is a real time: the same
    # answer as the general path (_utc_seconds), for every such string and every near miss.
    import random

    rng = random.Random(4)
    values = ["2026-12-01T10:00:00Z", "0999-01-01T00:00:00Z", "1000-01-01T00:00:00Z", "2026-02-29T00:00:00Z",
              "2024-02-29T23:59:59Z", "2026-12-01T24:00:00Z", "2026-12-01T23:59:60Z", "2026-13-01T00:00:00Z",
              "2026-12-01T10:00:00z", " 2026-12-01T10:00:00Z", "2026-12-01T10:00:00+02:00", "2026-12-01 10:00:00Z",
              "\u0662026-12-01T10:00:00Z", "2026-12-01T10:00:00.5Z", "2026-12-01", 5, None]
    for _ in range(2000):
        values.append(f"{rng.randint(900, 9999):04d}-{rng.randint(0, 13):02d}-{rng.randint(0, 32):02d}T"
                      f"{rng.randint(0, 25):02d}:{rng.randint(0, 61):02d}:{rng.randint(0, 61):02d}Z")
    for value in values:
        try:
            got = ("ok", fields.parse_timestamp(value, "metadata.creationTimestamp"))
        except fields.Invalid as err:
            got = ("invalid", err.field, err.message)
        try:
            want = ("ok", fields._parse_text(value, "metadata.creationTimestamp", fields._utc_seconds,
                                             "an RFC 3339 time"))
        except fields.Invalid as err:
            want = ("invalid", err.field, err.message)
        assert got == want, value
