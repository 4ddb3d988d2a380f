/* SPDX-License-Identifier: Apache-2.0
 *
 * tcpwatch.h - the one definition of what the kernel side tells userspace.
 *
 * Included by tcpwatch.bpf.c and parsed by agent/tcpwatch/schema.py, which turns
 * the #defines and `struct tw_event` below into its decoder. Keep to the subset
 * that parser reads: `#define TW_NAME <integer>` lines and one field per line
 * in the struct, typed with the __u8/__u16/__u32/__u64/__s32 family or char.
 * tests/unit/test_schema.py checks the parsed layout against gcc's offsetof().
 */
#ifndef TCPWATCH_H
#define TCPWATCH_H

#define TW_COMM_LEN 16

/* tw_event.kind */
#define TW_KIND_STATE 1 /* a TCP state transition */
#define TW_KIND_EOF 2   /* the owner read EOF (recv returned 0) on a socket in CLOSE_WAIT;
                           pid/tid/comm and TW_F_OWNER: that owner (no separate OWNER event) */
#define TW_KIND_OWNER 3 /* the owner of a socket in CLOSE_WAIT became known or changed */

/* tw_event.outcome: why a socket left its state, judged in the kernel */
#define TW_OUT_NONE 0     /* nothing known */
#define TW_OUT_CLOSE 1    /* close()/close_range() by the actor */
#define TW_OUT_SHUTDOWN 2 /* shutdown(SHUT_WR or SHUT_RDWR) by the actor */
#define TW_OUT_RESET 3    /* RST received from the peer */
#define TW_OUT_EXIT 4     /* the actor was exiting and its descriptors were released */
#define TW_OUT_ERROR 5    /* a socket error was reported (retransmit/keepalive timeout) */

/* tw_event.flags */
#define TW_F_OWNER 1          /* pid/tid/comm are the owner, seen in process context on this socket */
#define TW_F_OWNER_LISTENER 2 /* pid/tid/comm inherited from the listening socket on that port */
#define TW_F_PREV_UNKNOWN 4   /* entry into the old state predates tracing: prev_ns is 0 */
#define TW_F_ACTOR 8          /* actor_* is the task that caused this transition (process context) */
#define TW_F_EOF_READ 16      /* the owner has read EOF on this socket */
#define TW_F_READ_IN_CW 32    /* the owner read from the socket after it entered CLOSE_WAIT */
#define TW_F_CW_UNKNOWN 64    /* left CLOSE_WAIT but its entry predates tracing: cw_ns is 0 */
#define TW_F_RESCUED 128      /* handled by the rescue program: the tuple came from struct sock_common */

/* Slots of the per-CPU `counters` array. */
#define TW_CNT_EVENTS 0      /* events handed to the ring buffer */
#define TW_CNT_LOST 1        /* events the ring buffer had no room for */
#define TW_CNT_SOCK_MISS 2   /* transitions of sockets with no entry in the socket map */
#define TW_CNT_SOCK_FULL 3   /* socket map inserts that failed */
#define TW_CNT_FILTERED 4    /* transitions dropped by --pid/--port/--state */
#define TW_CNT_TRANSITIONS 5 /* every TCP state transition the state program ran for */
#define TW_CNT_CW_FULL 6     /* CLOSE_WAIT entries the `cw` map had no room for (TW_CFG_CW_MAP) */
#define TW_CNT_SOCK_INSERT 7 /* entries added to the socket map */
#define TW_CNT_SOCK_DELETE 8 /* entries removed from it by a socket's end (not by LRU eviction):
                                inserts - deletes - max entries is a floor on evictions */
#define TW_CNT_RESCUED 9     /* firings the classic state program was skipped for (another classic
                                program ran on the CPU) that the raw rescue program handled
                                instead: missed = the kernel's recursion misses - this */
#define TW_CNT_UNRAN 10      /* firings the rescue program found no record of the classic one
                                running for (any protocol until the layout is set): only the
                                loader's start-up check of the programs' order reads it */
#define TW_CNT_EXIT_AGG 11   /* CLOSE_WAIT exits counted in the `exits` map instead of sent */
#define TW_CNT_EXIT_FULL 12  /* exits sent one by one because the `exits` map was full */
#define TW_CNT_STALE_RAN 13  /* of RESCUED: firings whose skip a record left behind in `ran` hid
                                (trace: the socket map still showed the old state; top: the
                                `cw` map showed what tw_top would have changed unchanged) */
#define TW_CNT_SLOTS 14

/* Slots of the `config` array's one element (u64 v[TW_CFG_SLOTS]), written by the loader. */
#define TW_CFG_FILTER_PID 0    /* 1: only sockets whose owner is in `pid_filter` */
#define TW_CFG_FILTER_PORT 1   /* 1: only sockets with a local or remote port in `port_bits` */
#define TW_CFG_STATE_MASK 2    /* bit n set: send transitions whose old or new state is n; 0: all */
#define TW_CFG_NET_OFF 3       /* offset of sk->__sk_common.skc_net in struct sock, or -1 */
#define TW_CFG_NETNS_OFF 4     /* offset of net->ns.inum in struct net, or -1 (calibrated) */
#define TW_CFG_CALIB_PORT 5    /* while non-zero: dump struct net of a socket on this port */
#define TW_CFG_ENABLED 6       /* 0 until filters are set: track sockets, send nothing */
#define TW_CFG_CW_MAP 7        /* 1: sockets in CLOSE_WAIT live in the `cw` map and only their
                                  exits are sent (top); 0: every wanted event is sent (trace) */
#define TW_CFG_RESCUE 8        /* bit 0: the rescue program may read IPv4 tuples from struct
                                  sock_common, bit 1: IPv6 ones (both checked at start-up) */
#define TW_CFG_PROT_OFF 9      /* offset of skc_prot: a TCP socket points at tcp_prot or */
#define TW_CFG_TCP_PROT 10     /* tcpv6_prot, whose addresses the calibration sockets show */
#define TW_CFG_TCPV6_PROT 11
#define TW_CFG_V6_OFF 12       /* offset of skc_v6_daddr; skc_v6_rcv_saddr follows it */
#define TW_CFG_CW_RAW 13       /* 1 (top, with TW_CFG_CW_MAP): the raw program alone handles the
                                  state tracepoint, CLOSE_WAIT entries and exits only; the
                                  classic one is detached (see "top's raw path" in the C) */
#define TW_CFG_EXIT_DETAIL_NS 14 /* with TW_CFG_CW_RAW: an exit after a stay this long or longer
                                    is sent (exact duration); shorter ones are counted in `exits` */
#define TW_CFG_EPH_LO 15       /* the host's ip_local_port_range: an `exits` key drops the */
#define TW_CFG_EPH_HI 16       /* peer's port when it is in it and the local one is not */
#define TW_CFG_RAW_STATE 17    /* 1 (trace): the raw program tw_trace handles every transition with
                                  the tuple read from struct sock_common; the classic one is
                                  detached (see "trace's raw path" in the C) */
#define TW_CFG_SPORT_OFF 18    /* offset of inet_sk(sk)->inet_sport (network order), found on the
                                  calibration sockets; 0 while unknown (tw_trace needs it) */
#define TW_CFG_SYSNR 19        /* 1: close/shutdown outcomes from the number of the syscall the task
                                  is in (its saved registers, TW_HAVE_TASK_REGS), checked on the
                                  calibration sockets; the syscall tracepoints are detached */
#define TW_CFG_SLOTS 20

#define TW_CALIB_BYTES 512
#define TW_CALIB_SOCK 96
#define TW_CALIB_INET_AT 512  /* where the dump of struct inet_sock's fields starts: past */
#define TW_CALIB_INET 1024    /* struct sock (760-1400 bytes with the usual configs) */

/* `calib` map: what the state program saw of the loader's calibration sockets. Element 0:
 * the listener (its struct net too), element 1: the accepted child, with the tracepoint's
 * own view of its tuple to check struct reads against, and the syscall each was in: listen()
 * for the listener, close() for the child's ESTABLISHED -> FIN_WAIT1. */
struct tw_calib {
	__u64 net;
	__u8 sock[TW_CALIB_SOCK]; /* the head of struct sock */
	__u8 bytes[TW_CALIB_BYTES]; /* the head of its struct net */
	__u8 saddr[16];           /* the tracepoint's arguments */
	__u8 daddr[16];
	__u16 family;
	__u16 sport;
	__u16 dport;
	__u16 pad;
	__s64 sysnr;              /* current_sysnr(); 0 if not read (TW_HAVE_TASK_REGS unset) */
	__u8 inet[TW_CALIB_INET]; /* struct sock from TW_CALIB_INET_AT: inet_sport is in there */
};

/* One record per event, IPv4 addresses in the first 4 bytes of the 16. */
struct tw_event {
	__u64 ts_ns;      /* bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
	__u64 sk;         /* kernel address of struct sock: the socket id */
	__u64 prev_ns;    /* time spent in the old state */
	__u64 cw_ns;      /* time spent in CLOSE_WAIT, when leaving it */
	__u64 fin_read_ns; /* when the owner read EOF, 0 if never */
	__u8 saddr[16];
	__u8 daddr[16];
	__u32 pid;        /* owner (see flags), 0 if unknown */
	__u32 tid;
	__u32 actor_pid;  /* current task when TW_F_ACTOR: the closer on a CLOSE_WAIT exit */
	__u32 actor_tid;
	__u32 netns;      /* inode of the network namespace, 0 if unknown */
	__s32 kstack_id;  /* stack map ids, negative if not taken */
	__s32 ustack_id;
	__u16 family;     /* AF_INET or AF_INET6 */
	__u16 sport;      /* host byte order */
	__u16 dport;
	__u8 kind;
	__u8 oldstate;
	__u8 newstate;
	__u8 outcome;
	__u8 flags;
	__u8 pad;
	char comm[TW_COMM_LEN];
	char actor_comm[TW_COMM_LEN];
};

/* Value of the `cw` map (key: the struct sock address), read by userspace when it asks:
 * a socket in CLOSE_WAIT now, as the kernel knows it. Same address convention. */
struct tw_cw {
	__u64 ts_ns;       /* entry into CLOSE_WAIT (CLOCK_MONOTONIC) */
	__u64 fin_read_ns; /* when the owner read EOF, 0 if not yet */
	__u8 saddr[16];
	__u8 daddr[16];
	__u32 pid;         /* owner (see flags), 0 if unknown */
	__u32 tid;
	__u32 netns;
	__u16 family;
	__u16 sport;
	__u16 dport;
	__u8 flags;        /* TW_F_OWNER* | TW_F_EOF_READ | TW_F_READ_IN_CW */
	__u8 rst;          /* RST received (top's raw path: no socket map entry holds it) */
	char comm[TW_COMM_LEN];
};

/* Short CLOSE_WAIT stays, counted in the kernel instead of sent one by one (top's raw path):
 * key of the `exits` map. Who is the owner seen in process context on the socket, else the
 * closer; exits of sockets with neither, or only the listener's owner, are sent instead
 * (userspace may know better from /proc). */
struct tw_exit_key {
	__u8 daddr[16];
	__u32 pid;
	__u32 netns;
	__u16 family;
	__u16 sport;
	__u16 dport;      /* 0: a client's ephemeral port, any (TW_CFG_EPH_*) */
	__u8 outcome;
	__u8 newstate;
	__u8 who;         /* TW_F_OWNER or TW_F_ACTOR */
	__u8 pad[3];
	char comm[TW_COMM_LEN];
};

/* Durations in a log-linear histogram of 1,024 ns units: units below TW_EXIT_SUB each have a
 * bucket, then every power of two is cut in TW_EXIT_SUB equal buckets (at most 1/TW_EXIT_SUB
 * wide: userspace reports a bucket's middle, within 1/(2*TW_EXIT_SUB) of the true value). */
#define TW_EXIT_SHIFT 10
#define TW_EXIT_SUB_BITS 3
#define TW_EXIT_SUB 8
#define TW_EXIT_MAX_LOG 40    /* stays of 2^40 units (13 days) and over share the last bucket */
#define TW_EXIT_BUCKETS 304   /* (TW_EXIT_MAX_LOG - TW_EXIT_SUB_BITS + 1) * TW_EXIT_SUB */

/* Value of the `exits` map: counts since tracing began (userspace takes differences). */
struct tw_exit_agg {
	__u64 count;
	__u32 hist[TW_EXIT_BUCKETS];
};

#endif /* TCPWATCH_H */
