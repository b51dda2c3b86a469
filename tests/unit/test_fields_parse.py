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
            fields._ip_address(text)
    else:
        got = fields._ip_address(text)
        assert got == expected and type(got) is type(expected)


def test_a_bad_endpoint_address_names_its_field():
    with pytest.raises(fields.Invalid) as err:
        fields.parse_ipv4("198.18.0.300", "endpoints[3].addresses[0]")
    assert err.value.field == "endpoints[3].addresses[0]"
