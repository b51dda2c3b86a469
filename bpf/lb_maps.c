/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The pinned maps alone, no program: what the agent compiles first at start
 * (ebpfsvc/datapath/loader.py open_maps) to write the maps while lb_pod.c and
 * lb_node.c compile. It compiles in a fraction of a second, where the programs
 * take seconds; the programs a previous run attached keep forwarding from these
 * same maps meanwhile.
 */

#include "abi.h"
#include "maps.h"

/* Never loaded. bcc emits BTF only for a unit with a function in it, and the
 * socket-local storage map (lb_sock_path) cannot be created without BTF for its
 * key and value (the kernel answers EINVAL): this gives the unit one. */
int lb_maps_btf(void *ctx)
{
	return 0;
}
