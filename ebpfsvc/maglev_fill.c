/* The Maglev population loop (Eisenbud et al., NSDI'16, pseudocode 1) in C, for many tables in
 * one call: ebpfsvc/maglev.py builds the agent's tables through it (cffi), and keeps the same loop
 * in Python (_fill_sequential) for machines without a compiler; tests/unit/test_maglev.py checks
 * both give the same tables.
 *
 * Table t has n[t] backends, in sorted-name order, whose two name hashes are at
 * h_offset/h_skip[first + i] (first = the sum of the n of the tables before it), and size[t]
 * slots at out[start + ...] (start = the sum of the sizes before it).  Each slot receives
 * value[first + i] of the backend that owns it (a backend id, or i itself).  Sizes are prime and
 * >= n, checked by the caller.  Returns 0, or -1 when out of memory.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int maglev_fill(uint64_t tables, const uint32_t *n, const uint32_t *size,
                const uint64_t *h_offset, const uint64_t *h_skip, const uint32_t *value, uint32_t *out)
{
    uint32_t max_size = 0, max_n = 0;
    for (uint64_t t = 0; t < tables; t++) {
        if (size[t] > max_size)
            max_size = size[t];
        if (n[t] > max_n)
            max_n = n[t];
    }
    /* One scratch for every table: the slots taken so far, and each backend's next candidate
     * and step (offset + j * skip mod M, advanced by addition: no multiply or modulo per step). */
    uint8_t *taken = malloc(max_size ? max_size : 1);
    uint32_t *next = malloc(sizeof(uint32_t) * (max_n ? max_n : 1));
    uint32_t *skip = malloc(sizeof(uint32_t) * (max_n ? max_n : 1));
    if (!taken || !next || !skip) {
        free(taken);
        free(next);
        free(skip);
        return -1;
    }
    uint64_t first = 0, start = 0;
    for (uint64_t t = 0; t < tables; t++) {
        uint32_t m = size[t], count = n[t];
        uint32_t *slots = out + start;
        if (m && count) {
            memset(taken, 0, m);
            for (uint32_t i = 0; i < count; i++) {
                next[i] = (uint32_t)(h_offset[first + i] % m);
                skip[i] = (uint32_t)(h_skip[first + i] % (m - 1) + 1);
            }
            uint32_t filled = 0;
            while (filled < m) {
                for (uint32_t i = 0; i < count && filled < m; i++) {
                    uint32_t c = next[i], s = skip[i];
                    while (taken[c]) {
                        c += s;
                        if (c >= m)
                            c -= m;
                    }
                    taken[c] = 1;
                    slots[c] = value[first + i];
                    filled++;
                    c += s;
                    next[i] = c >= m ? c - m : c;
                }
            }
        }
        first += count;
        start += m;
    }
    free(taken);
    free(next);
    free(skip);
    return 0;
}

/* Tables filled with positions (value[i] = i: maglev_fill before the backends' ids are known, see
 * maglev.start_positions) made tables of values: table t, whose positions are at
 * positions[src[t] ..] and whose n values start at value[first[t]], goes to out back to back,
 * slot j as value[first[t] + positions[src[t] + j]].  Returns 0. */
int maglev_take(uint64_t tables, const uint32_t *size, const uint64_t *src, const uint64_t *first,
                const uint32_t *value, const uint32_t *positions, uint32_t *out)
{
    for (uint64_t t = 0; t < tables; t++) {
        const uint32_t *from = positions + src[t], *v = value + first[t];
        for (uint32_t j = 0; j < size[t]; j++)
            *out++ = v[from[j]];
    }
    return 0;
}
