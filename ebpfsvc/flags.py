"""Flag value types of `ebpfsvc agent`, written as kube-proxy writes them, and its one-line errors.

kube-proxy's durations are Go durations (`30s`, `1m0s`, `500ms`, `24h0m0s`); a plain number is
still read as seconds, as our flags always took. Addresses, CIDRs, bind addresses and port ranges
are checked where they are read, so a bad value is refused before anything starts.

Every error an operator can cause from the command line or the --config file is ONE line on
stderr, naming the flag (or the file and key) and the value, and the agent exits non-zero:

    ebpfsvc agent: --nodeport-addresses 10.0.0/33: not an IPv4 CIDR
    ebpfsvc agent: --config /etc/ebpfsvc/config.yaml: node-address: x: not an IPv4 address
    ebpfsvc agent: --healthz-bind-address 0.0.0.0:10256: address already in use (is kube-proxy ...)

A traceback is for bugs: configuration mistakes are not bugs, and in a crash-looping pod the line
that matters would scroll away under the stack.
"""

from __future__ import annotations

import ipaddress
import math
import re
import sys

import click
from click.core import ParameterSource

from ebpfsvc.health import parse_bind_address

PROG = "ebpfsvc agent"


class _Checked(click.ParamType):
    """Our types: their messages start with the value (`VALUE: problem`), to follow the flag."""


# ---- durations ------------------------------------------------------------------------------------

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_TERM = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


_NOT_A_DURATION = "not a duration (like 30s, 1m0s, 500ms, or seconds)"


def parse_duration(value) -> float:
    """A Go duration (`1h2m3.5s`, `500ms`) or a plain number of seconds -> seconds (>= 0)."""
    if isinstance(value, bool):
        raise ValueError(_NOT_A_DURATION)
    text = str(value).strip()
    try:
        seconds = float(text)
    except ValueError:
        terms = list(_TERM.finditer(text))
        if not text or "".join(m.group(0) for m in terms) != text:
            raise ValueError(_NOT_A_DURATION) from None
        seconds = sum(float(m.group(1)) * _UNITS[m.group(2)] for m in terms)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("not a duration: must be 0 or more")
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds as Go prints a time.Duration: 30s, 1m0s, 24h0m0s, 500ms, 0s."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        for unit, scale in (("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
            if seconds >= scale:
                return f"{_trim(seconds / scale)}{unit}"
        return f"{_trim(seconds / 1e-9)}ns"
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    out = f"{_trim(s)}s"
    if h or m:
        out = f"{int(m)}m{out}"
    if h:
        out = f"{int(h)}h{out}"
    return out


def _trim(x: float) -> str:
    return f"{round(x, 9):.9f}".rstrip("0").rstrip(".")


class Duration(_Checked):
    """A Go duration or seconds -> float seconds. `positive`: 0 is refused; `whole`: whole seconds."""

    name = "duration"

    def __init__(self, positive: bool = False, whole: bool = False):
        self.positive = positive
        self.whole = whole

    def convert(self, value, param, ctx):
        try:
            seconds = parse_duration(value)
        except ValueError as e:
            self.fail(f"{value}: {e}", param, ctx)
        if self.positive and seconds <= 0:
            self.fail(f"{value}: must be more than 0", param, ctx)
        if self.whole and seconds != int(seconds):
            self.fail(f"{value}: must be whole seconds (conntrack lifetimes are kept in seconds)", param, ctx)
        return seconds


# ---- addresses ------------------------------------------------------------------------------------

class IPv4Address(_Checked):
    name = "address"
    family = ipaddress.IPv4Address

    def convert(self, value, param, ctx):
        if isinstance(value, self.family):
            return value
        try:
            return self.family(str(value).strip())
        except ValueError:
            self.fail(f"{value}: not an {self.family.__name__[:4]} address", param, ctx)


class IPv6Address(IPv4Address):
    family = ipaddress.IPv6Address


class IPv4Network(_Checked):
    """A CIDR; host bits must be zero, as the API server and kube-proxy insist."""

    name = "cidr"

    def convert(self, value, param, ctx):
        if isinstance(value, ipaddress.IPv4Network):
            return value
        text = str(value).strip()
        try:
            return ipaddress.IPv4Network(text)
        except ValueError as e:
            if "/" in text and "has host bits set" in str(e):
                self.fail(f"{value}: host bits set (did you mean {ipaddress.IPv4Network(text, strict=False)}?)",
                          param, ctx)
            self.fail(f"{value}: not an IPv4 CIDR", param, ctx)


class NodePortAddress(_Checked):
    """One --nodeport-addresses value: a CIDR (host bits allowed, as kube-proxy reads it; IPv6 ones
    are accepted and serve nothing yet) or `primary` (nodeinfo.PRIMARY). Stays a string."""

    name = "cidr|primary"

    def convert(self, value, param, ctx):
        from ebpfsvc.nodeinfo import PRIMARY

        text = str(value).strip()
        if text == PRIMARY:
            return text
        try:
            return str(ipaddress.ip_network(text, strict=False))
        except ValueError:
            self.fail(f"{value}: not an IPv4 CIDR", param, ctx)


class IPFamilies(_Checked):
    """--ip-families: IPv4, IPv6 or IPv4,IPv6 -> a tuple of family names (config.parse_ip_families);
    with auto=True also "auto" (config.AUTO_IP_FAMILIES), kept as that string."""

    name = "families"

    def __init__(self, auto: bool = False):
        self.auto = auto

    def convert(self, value, param, ctx):
        from ebpfsvc.config import AUTO_IP_FAMILIES, parse_ip_families

        if isinstance(value, tuple) or (self.auto and value == AUTO_IP_FAMILIES):
            return value
        try:
            return parse_ip_families(value if isinstance(value, list) else str(value))
        except ValueError as e:
            self.fail(f"{value}: {e}", param, ctx)


class BindAddress(_Checked):
    """kube-proxy's bind address: IP:PORT, :PORT or IP; "" disables the server. Stays a string."""

    name = "ip:port"

    def __init__(self, default_port: int):
        self.default_port = default_port

    def convert(self, value, param, ctx):
        text = str(value).strip()
        if not text:
            return ""
        try:
            host, port = parse_bind_address(text, self.default_port)
            ipaddress.IPv4Address(host)
        except ValueError:
            self.fail(f"{value}: not IP:PORT (like 0.0.0.0:{self.default_port})", param, ctx)
        if not 0 <= port <= 65535:
            self.fail(f"{value}: port {port} is not 0-65535", param, ctx)
        return text


class PortRange(_Checked):
    """LOW-HIGH -> (low, high), 1 <= low <= high <= 65535 (config.parse_port_range)."""

    name = "low-high"

    def convert(self, value, param, ctx):
        from ebpfsvc.config import parse_port_range

        try:
            return parse_port_range(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


# ---- one-line errors ------------------------------------------------------------------------------

class AgentError(click.ClickException):
    """A configuration or environment problem the operator must fix: one line, exit code 1."""

    exit_code = 1

    def format_message(self) -> str:
        return f"{PROG}: {self.message}"

    def show(self, file=None) -> None:
        click.echo(self.format_message(), file=file or sys.stderr)


def _flag(param) -> str:
    if param is None:
        return ""
    longs = [o for o in getattr(param, "opts", ()) if o.startswith("--")]
    return longs[0] if longs else (param.name or "")


def one_line(err: click.UsageError, config_path: str | None = None) -> str:
    """A click parsing error as `FLAG VALUE: problem` (or `--config FILE: key: VALUE: problem`)."""
    param = getattr(err, "param", None)
    plain = type(err) is click.BadParameter and param is not None
    message = " ".join((err.message if plain else err.format_message()).split())
    if not plain:
        return message                      # click names the option itself (missing, unknown)
    flag = _flag(param)
    sep = " " if isinstance(param.type, _Checked) else ": "
    ctx = err.ctx
    if ctx is not None and config_path and ctx.get_parameter_source(param.name) is ParameterSource.DEFAULT_MAP:
        return f"--config {config_path}: {flag.lstrip('-')}{sep.rstrip() or ':'} {message}"
    return f"{flag}{sep}{message}"


class OneLineErrors(click.Command):
    """A click command whose usage errors are one line each (see the module docstring)."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except AgentError:
            raise
        except click.UsageError as e:         # BadParameter, MissingParameter, NoSuchOption, ...
            path = e.ctx.meta.get(CONFIG_META) if e.ctx is not None else None
            raise AgentError(one_line(e, path)) from None


#: ctx.meta key under which the --config callback notes the file it read, for error messages.
CONFIG_META = "ebpfsvc.config_path"
