"""bcc's compiles in a child process, so that the agent never holds LLVM (issue 12: agent memory).

bcc compiles with the LLVM linked into libbcc, in the calling process, and LLVM's heap stays: a
lab agent that compiled its programs itself peaked at 387 MiB of its own memory, one whose compiles
ran in a child at 163 MiB (docs/operations.md, "Memory: compiles in a child process"). So with the
program cache on, the agent's compiles run in a child, `python -m ebpfsvc.datapath.compiler REQUEST`,
which does what loader.load and loader.open_maps would do in-process -- compile, have the kernel
verify, keep the result in the program cache (progcache.store, store_layout) and pin the
programs beside the maps -- and exits, taking LLVM's memory with it. The agent then opens the
result as a restart does: the maps from the kept layout and their pins, the programs from their
pins (progcache.reuse_pinned), nothing verified twice.

A child never recreates pins of another shape (a changed limit: the agent migrates their entries
itself, in-process) and never writes an entry: a failure of any kind is one log line, and the
caller compiles in-process as before.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 900       # lb_node.c takes 15-60 s on a busy 2-core node; a hung child must end
STALE_PINS = 3              # the child's exit code for pins of another shape: left to the caller


def command(request: dict) -> list[str]:
    """The child's command line for `request` (main's argument)."""
    return [sys.executable, "-m", __name__, json.dumps(request)]


def run(request: dict) -> bool:
    """Have a child do `request` (main's argument); True when it did, and its output is then in
    the program cache and the pin directory."""
    try:
        done = subprocess.run(command(request), capture_output=True, text=True, timeout=TIMEOUT_SECONDS, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("compile of %s in a child process failed (%s): compiling in the agent", _what(request), e)
        return False
    if done.returncode == STALE_PINS:
        return False        # the caller's own load recreates the pins, and says so
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        log.warning("compile of %s in a child process failed (exit %d: %s): compiling in the agent",
                    _what(request), done.returncode, lines[-1] if lines else "no output")
        return False
    return True


def maps_request(pin_dir, limits) -> dict:
    return {"kind": "maps", "pin_dir": str(pin_dir), "limits": limits.__dict__}


def programs_request(pin_dir, limits, source, programs, options: dict) -> dict:
    return {"kind": "programs", "pin_dir": str(pin_dir), "limits": limits.__dict__, "source": str(source),
            "programs": list(programs), "options": options}


def _what(request: dict) -> str:
    return Path(request["source"]).name if request["kind"] == "programs" else "the maps unit"


def main(argv: list[str]) -> int:
    from ebpfsvc.datapath import loader

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    request = json.loads(argv[0])
    pin_dir, limits = Path(request["pin_dir"]), loader.Limits(**request["limits"])
    if request["kind"] == "maps":
        opened = loader.open_maps(pin_dir, limits=limits, program_cache=True)
        if opened is None:
            return STALE_PINS
        opened[0].cleanup()
        return 0
    try:
        dp = loader.load(pin_dir, limits=limits, cache=False, program_cache=True, source=Path(request["source"]),
                         programs=tuple(request["programs"]), recreate_pins=False, **request["options"])
    except loader.StalePins:
        return STALE_PINS
    dp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
