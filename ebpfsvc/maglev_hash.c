/* The two hashes of every backend name of a full sync, in one call: ebpfsvc/maglev.py hashes
 * names through it (cffi, linked with libb2, the BLAKE2 authors' library) when it can be built,
 * and with hashlib otherwise.  Both are BLAKE2b with an 8-byte digest and a personalisation, so
 * the tables are the same either way (tests/unit/test_maglev.py compares them).  Why in C: a
 * full sync of 10,000 Services hashes 100,000 names twice, and each hashlib call costs about
 * half a microsecond of Python around a tenth of hashing.
 *
 * Name i is blob[start .. start + length[i]) (start = the sum of the lengths before it); its two
 * digests, read as little-endian integers (int.from_bytes(digest, "little")), go to h_offset[i]
 * and h_skip[i].  person_offset and person_skip are 16 bytes each (the personalisation, zero-
 * padded).  Returns 0, or -1 when libb2 refuses (it does not for these parameters).
 */
#include <blake2.h>
#include <stdint.h>
#include <string.h>

static int keyed_up(blake2b_state *s, const uint8_t *person)
{
    blake2b_param p;
    memset(&p, 0, sizeof(p));
    p.digest_length = 8;
    p.fanout = 1;
    p.depth = 1;
    memcpy(p.personal, person, sizeof(p.personal));
    return blake2b_init_param(s, &p);
}

static uint64_t digest(const blake2b_state *base, const uint8_t *in, uint32_t len, int *err)
{
    blake2b_state s = *base;        /* the keyed-up state, copied: no parameter block per name */
    uint8_t out[8];
    if (blake2b_update(&s, in, len) != 0 || blake2b_final(&s, out, sizeof(out)) != 0)
        *err = -1;
    uint64_t h = 0;
    for (int k = 7; k >= 0; k--)
        h = (h << 8) | out[k];
    return h;
}

int maglev_name_hashes(uint64_t count, const uint8_t *blob, const uint32_t *length,
                       const uint8_t *person_offset, const uint8_t *person_skip,
                       uint64_t *h_offset, uint64_t *h_skip)
{
    blake2b_state off, skip;
    if (keyed_up(&off, person_offset) != 0 || keyed_up(&skip, person_skip) != 0)
        return -1;
    int err = 0;
    for (uint64_t i = 0; i < count; i++) {
        h_offset[i] = digest(&off, blob, length[i], &err);
        h_skip[i] = digest(&skip, blob, length[i], &err);
        blob += length[i];
    }
    return err;
}
