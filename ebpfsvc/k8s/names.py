"""Kubernetes' rules for object and port names (apimachinery's validation.IsDNS1123Label and friends).

The API server refuses a name that breaks them; objects from a manifest directory, or a proxy in
front of a real API server, reach us unchecked.  A name travels into map keys, log lines and
metric labels, so a name outside these rules (a colon, a slash, a lone surrogate that cannot even
be encoded) must stop at the model boundary, costing that one object, and never reach the writer.

    DNS-1123 label      namespaces, Service and EndpointSlice port names   [a-z0-9]([-a-z0-9]*[a-z0-9])?, <= 63
    DNS-1035 label      Service names (they become DNS names)              [a-z]([-a-z0-9]*[a-z0-9])?, <= 63
    DNS-1123 subdomain  EndpointSlice, Endpoints, Node, ServiceCIDR names  labels joined by dots, <= 253
    label value         the kubernetes.io/service-name label               ([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9], <= 63
"""

from __future__ import annotations

import re

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", re.ASCII)
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?", re.ASCII)
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", re.ASCII)
_LABEL_VALUE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]", re.ASCII)

LABEL_MAX = 63
SUBDOMAIN_MAX = 253

#: rule name -> (pattern, longest length, what it is called in the message)
RULES = {
    "dns1123-label": (_DNS1123_LABEL, LABEL_MAX, "a DNS-1123 label (lower-case letters, digits and '-', "
                                                 "starting and ending with a letter or digit)"),
    "dns1035-label": (_DNS1035_LABEL, LABEL_MAX, "a DNS-1035 label (lower-case letters, digits and '-', "
                                                 "starting with a letter, ending with a letter or digit)"),
    "dns1123-subdomain": (_DNS1123_SUBDOMAIN, SUBDOMAIN_MAX, "a DNS-1123 subdomain (DNS-1123 labels joined "
                                                             "by '.')"),
    "label-value": (_LABEL_VALUE, LABEL_MAX, "a label value (letters, digits, '-', '_' and '.', starting and "
                                             "ending with a letter or digit)"),
}


def shown(value: str) -> str:
    """A name as a log line can always carry it: repr() escapes what cannot be encoded."""
    text = repr(value)
    return text if len(text) <= 70 else text[:67] + "..."


def name_problem(value: str, rule: str) -> str:
    """What is wrong with `value` under `rule` (a RULES key); "" when nothing is."""
    pattern, longest, what = RULES[rule]
    if len(value) > longest:
        return f"{shown(value)} is longer than {longest} characters"
    if not pattern.fullmatch(value):
        return f"{shown(value)} is not {what}"
    return ""
