"""The BPF tier's map sizes and lifetimes (tests/conftest.py's AheadCompiles reads them too: a plain
module, with nothing of pytest's in it)."""

from __future__ import annotations

from ebpfsvc.datapath import loader

# Small maps: LRU maps preallocate, and every array is zeroed before each test.
TEST_LIMITS = loader.Limits(
    frontends=1024, services=1024, backends=1024, maglev_slots=1 << 16,
    ct_entries=4096, affinity_entries=1024, frag_entries=256, snat_entries=4096, source_ranges=256,
)
# test_conntrack.py's `tuned` datapath: lifetimes set the way the agent's --conntrack-* flags set them,
# --conntrack-udp-timeout 5s, --conntrack-udp-timeout-stream 20s, --conntrack-tcp-timeout-close-wait 9s,
# --conntrack-tcp-timeout-established 40s (each far below abi.h's default). Another compile (the
# lifetimes are in the instructions), which AheadCompiles does beforehand.
TUNED_LIMITS = loader.Limits(**{**TEST_LIMITS.__dict__, **loader.conntrack_limits(
    udp=5, udp_stream=20, tcp_close_wait=9, tcp_established=40)})
