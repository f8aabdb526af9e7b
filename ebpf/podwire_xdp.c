// SPDX-License-Identifier: (MIT OR GPL-2.0-only)
//
// podwire's XDP program: steers what podwire owns into the AF_XDP socket of the queue it
// arrived on and passes everything else to the kernel untouched.
//
// - Underlay role: IPv4 UDP addressed to the node's own address and podwire's port (VXLAN
//   8472 or flannel udp 8285), unfragmented only (the kernel reassembles fragments). Also, when
//   podwire serves NodePorts or masquerades pods, TCP and UDP to the node's address whose
//   destination port is a NodePort (`node_ports`) or in podwire's masquerade range (the
//   replies of masqueraded connections), and ICMP errors about packets sent from those ports
//   (path MTU discovery). ARP, ND, SSH, other UDP and ICMP, fragments: XDP_PASS.
// - Pod role (a pod's veth host end): IPv4 from the pod's own address (`pod_addr`; other
//   sources pass to the kernel, counted) that podwire routes: to the cluster
//   network outside the node's own lease, to the service range, and (when podwire
//   masquerades) TCP and UDP to anywhere else but the node's own address and destinations no
//   masquerade may reach. Traffic to the host, to the node's other pods
//   and (without masquerade) to the outside, ARP and IPv6 pass to the kernel.
// - Bridge-port role (a pod's veth host end in L2 mode, where podwire is the node's bridge):
//   every frame, whatever it carries (ARP, IPv6, broadcasts): the host end has no address and
//   the kernel has nothing to do with it.
//
// Counters are per CPU (no atomics on the fast path); podwire sums them.
// Built by dataplane/build.rs with `clang -O2 -g -target bpf` and embedded in the binary.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define ROLE_UNDERLAY 0
#define ROLE_POD 1
#define ROLE_BRIDGE_PORT 2

// What podwire tells the program: its role on this interface, and for the underlay the node's
// address and the data port, both in network byte order, and the masquerade port range (host
// byte order; empty when masq_lo > masq_hi).
struct config {
    __u32 role;
    __u32 local_ip;
    __u16 port;
    __u16 pad;
    __u16 masq_lo;
    __u16 masq_hi;
    // Pod role, network byte order: the cluster network, the node's lease, the service range.
    __u32 net_addr;
    __u32 net_mask;
    __u32 lease_addr;
    __u32 lease_mask;
    __u32 svc_addr;
    __u32 svc_mask;
    // Pod role, network byte order: the pod's own address, the only source it may send from.
    __u32 pod_addr;
    // Pod role, network byte order: the node's underlay address.
    __u32 node_addr;
};

enum counter {
    // Redirected to an AF_XDP socket.
    CNT_REDIRECTED = 0,
    // Ours, but the queue has no socket (yet): passed to the kernel instead.
    CNT_NO_SOCKET = 1,
    // Not ours: passed to the kernel.
    CNT_PASSED = 2,
    // Too short for the headers it claims: passed (the kernel drops and counts it).
    CNT_MALFORMED = 3,
    // Pod role: from a source other than the pod's own address: passed to the kernel.
    CNT_FOREIGN_SOURCE = 4,
    CNT_MAX = 5,
};

struct {
    __uint(type, BPF_MAP_TYPE_XSKMAP);
    __uint(max_entries, 64);
    __type(key, __u32);
    __type(value, __u32);
} xsks_map SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct config);
} config_map SEC(".maps");

// NodePorts podwire serves: key (protocol << 16 | port in host byte order), any value.
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 4096);
    __type(key, __u32);
    __type(value, __u8);
} node_ports SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, CNT_MAX);
    __type(key, __u32);
    __type(value, __u64);
} counters SEC(".maps");

static __always_inline void count(__u32 which)
{
    __u64 *c = bpf_map_lookup_elem(&counters, &which);
    if (c)
        *c += 1;
}

static __always_inline int pass(__u32 why)
{
    count(why);
    return XDP_PASS;
}

// Hands the frame to the queue's socket; without one, the kernel gets it (the lower bits of
// the flags are the action when the map has no entry).
static __always_inline int to_socket(struct xdp_md *ctx)
{
    __u32 queue = ctx->rx_queue_index;
    if (!bpf_map_lookup_elem(&xsks_map, &queue))
        return pass(CNT_NO_SOCKET);
    count(CNT_REDIRECTED);
    return bpf_redirect_map(&xsks_map, queue, XDP_PASS);
}

// Whether a TCP or UDP port of the node's address is podwire's: a NodePort, or one of the
// masquerade range. `proto` is the protocol number, `port` in host byte order.
static __always_inline int owned_port(struct config *cfg, __u8 proto, __u16 port)
{
    if (port >= cfg->masq_lo && port <= cfg->masq_hi)
        return 1;
    __u32 key = (__u32)proto << 16 | port;
    return bpf_map_lookup_elem(&node_ports, &key) != 0;
}

// An ICMP error about a packet podwire sent from an owned port (a router's "fragmentation
// needed" for a masqueraded connection, say) goes to podwire, which owns that connection;
// every other ICMP message goes to the kernel.
static __always_inline int icmp_error(struct xdp_md *ctx, struct config *cfg, struct iphdr *ip,
                                      void *end)
{
    if (ip->frag_off & bpf_htons(0x1fff | 0x2000))
        return pass(CNT_PASSED);
    __u8 *icmp = (void *)ip + ip->ihl * 4;
    if ((void *)(icmp + 8) > end)
        return pass(CNT_MALFORMED);
    // Destination unreachable, time exceeded, parameter problem.
    if (icmp[0] != 3 && icmp[0] != 11 && icmp[0] != 12)
        return pass(CNT_PASSED);
    struct iphdr *quoted = (void *)(icmp + 8);
    if ((void *)(quoted + 1) > end)
        return pass(CNT_MALFORMED);
    if (quoted->saddr != cfg->local_ip || quoted->ihl < 5)
        return pass(CNT_PASSED);
    if (quoted->protocol != IPPROTO_UDP && quoted->protocol != IPPROTO_TCP)
        return pass(CNT_PASSED);
    struct udphdr *ports = (void *)quoted + quoted->ihl * 4;
    if ((void *)(ports + 1) > end)
        return pass(CNT_MALFORMED);
    if (!owned_port(cfg, quoted->protocol, bpf_ntohs(ports->source)))
        return pass(CNT_PASSED);
    return to_socket(ctx);
}

// Pod role: whether podwire routes this packet from a pod (see the top of the file).
static __always_inline int from_pod(struct xdp_md *ctx, struct config *cfg, struct iphdr *ip)
{
    // Only the pod's own address skips the host's stack. Anything else goes where the pod's
    // packets went before podwire: to the kernel, whose rules (rp_filter, routing, its
    // masquerade) apply, and whatever it routes into the TUN is held to the node's lease.
    // Passed rather than dropped so that a pod's other addresses keep working that way.
    if (ip->saddr != cfg->pod_addr)
        return pass(CNT_FOREIGN_SOURCE);
    __u32 dst = ip->daddr;
    if (dst == cfg->local_ip)
        return pass(CNT_PASSED);
    if ((dst & cfg->svc_mask) == cfg->svc_addr)
        return to_socket(ctx);
    if ((dst & cfg->lease_mask) == cfg->lease_addr)
        return pass(CNT_PASSED);
    if ((dst & cfg->net_mask) == cfg->net_addr)
        return to_socket(ctx);
    int masquerading = cfg->masq_lo <= cfg->masq_hi;
    if (!masquerading || (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP))
        return pass(CNT_PASSED);
    // Never masqueraded: the node itself, and 0/8, 127/8, 169.254/16, multicast, broadcast
    // (podwire would drop them as martian_destination): the kernel's to deliver or refuse.
    __u32 d = bpf_ntohl(dst);
    __u8 first = d >> 24;
    if (dst == cfg->node_addr || first == 0 || first == 127 || (d >> 16) == 0xa9fe ||
        first >= 224)
        return pass(CNT_PASSED);
    return to_socket(ctx);
}

SEC("xdp")
int podwire_xdp(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    __u32 zero = 0;
    struct config *cfg = bpf_map_lookup_elem(&config_map, &zero);
    if (!cfg)
        return pass(CNT_PASSED);

    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end)
        return pass(CNT_MALFORMED);
    if (cfg->role == ROLE_BRIDGE_PORT)
        return to_socket(ctx);
    if (eth->h_proto != bpf_htons(ETH_P_IP))
        return pass(CNT_PASSED);
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end)
        return pass(CNT_MALFORMED);
    if (ip->version != 4 || ip->ihl < 5)
        return pass(CNT_MALFORMED);
    if (cfg->role == ROLE_POD)
        return from_pod(ctx, cfg, ip);
    if (ip->daddr != cfg->local_ip)
        return pass(CNT_PASSED);
    if (ip->protocol == IPPROTO_ICMP)
        return icmp_error(ctx, cfg, ip, end);
    if (ip->protocol != IPPROTO_UDP && ip->protocol != IPPROTO_TCP)
        return pass(CNT_PASSED);
    // Later fragments carry no ports: the kernel reassembles those.
    if (ip->frag_off & bpf_htons(0x1fff | 0x2000))
        return pass(CNT_PASSED);
    // Source and destination ports sit first in both UDP and TCP headers.
    struct udphdr *l4 = (void *)ip + ip->ihl * 4;
    if ((void *)(l4 + 1) > end)
        return pass(CNT_MALFORMED);
    if (ip->protocol == IPPROTO_UDP && l4->dest == cfg->port)
        return to_socket(ctx);
    if (owned_port(cfg, ip->protocol, bpf_ntohs(l4->dest)))
        return to_socket(ctx);
    return pass(CNT_PASSED);
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
