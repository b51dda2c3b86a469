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
