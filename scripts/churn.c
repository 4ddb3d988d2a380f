// SPDX-License-Identifier: Apache-2.0
//
// churn: loopback TCP connection churn for scripts/bench (and scripts/bench_scale).
//
//   gcc -O2 -pthread -o churn scripts/churn.c
//   ./churn --port 47999 --seconds 5            # as fast as it goes for 5 s
//   ./churn --port 47999 --count 1000           # exactly 1000 connections (calibration)
//   ./churn --port 47999 --hold 100000 --rate 5000  # 100k sockets in CLOSE_WAIT, then wait
//
// Each connection: the client connect()s and close()s at once; a server thread accept()s,
// waits for the FIN (poll POLLRDHUP), recv()s until EOF (0), then close()s. The client closes first, so the *server* socket passes
// through CLOSE_WAIT on every connection and both sides do the full FIN handshake:
//   client  CLOSE>SYN_SENT>ESTABLISHED>FIN_WAIT1>FIN_WAIT2>CLOSE                    (5)
//   server  LISTEN>SYN_RECV>ESTABLISHED>CLOSE_WAIT>LAST_ACK>CLOSE                   (5)
// plus CLOSE>LISTEN and LISTEN>CLOSE once for the listener (scripts/bench calibrates this
// with a real trace). The server's recv() returning 0 is one more kernel event for tracers
// that watch reads (tcpwatch's EOF event).
//
// TIME_WAIT: the client closes first, so the client's 4-tuple sits in TIME_WAIT (a
// timewait socket: the full socket still goes FIN_WAIT2>CLOSE, so transition counts do not
// depend on it). To keep ephemeral ports from running out, clients bind to --addrs source
// addresses 127.1.0.1, 127.1.0.2, ... with IP_BIND_ADDRESS_NO_PORT, so each source address
// has its own port range; with net.ipv4.tcp_tw_reuse=2 (the default: loopback only) and
// tcp_max_tw_buckets the rate stays flat across rounds. Connect errors are counted and printed.
//
// Output: one JSON line on stdout when done:
//   {"connections": N, "seconds": S, "rate": N/S, "errors": E, "first_error": "..."}
// "connections" counts connections whose server side closed after reading EOF; the program
// waits for every connection it opened to finish (or --drain-ms) before it exits, so a tracer
// stopped after churn exits has seen every transition.
// With --hold, holder processes (as many as RLIMIT_NOFILE requires) accept N connections and
// keep them open without reading: N server sockets in CLOSE_WAIT. It prints {"held": N, ...}
// and waits until stdin closes (or SIGTERM/SIGINT), then the holders close them all.

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

static int opt_port = 47999;
static double opt_seconds = 5.0;
static double opt_rate = 0; // --hold: connections/s in all, 0: unpaced
static long opt_count = 0;   // > 0: exactly this many connections
static long opt_hold = 0;    // > 0: hold this many server sockets in CLOSE_WAIT
static int opt_clients = 2;
static int opt_servers = 2;
static int opt_addrs = 32;
static int opt_drain_ms = 3000;

static int listen_fd = -1;
static atomic_int stop_clients;
static atomic_int stop_servers;
static atomic_long started;     // connect() attempts claimed (for --count)
static atomic_long connected;   // client connect() succeeded
static atomic_long completed;   // server read EOF and closed
static atomic_long accepted;
static atomic_long errors;
static atomic_int first_errno;
static atomic_long *held; // --hold, shared with the holder processes: held, errors, errno

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void note_error(int err)
{
	int zero = 0;

	atomic_fetch_add(&errors, 1);
	atomic_compare_exchange_strong(&first_errno, &zero, err);
}

static void *client(void *arg)
{
	long id = (long)arg;
	struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(opt_port)};
	struct sockaddr_in src = {.sin_family = AF_INET, .sin_port = 0};
	unsigned long n = (unsigned long)id;
	int one = 1;

	dst.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	while (!atomic_load_explicit(&stop_clients, memory_order_relaxed)) {
		long limit = opt_hold ? opt_hold : opt_count;

		if (limit && atomic_fetch_add(&started, 1) >= limit)
			break;
		int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd < 0) {
			note_error(errno);
			usleep(1000);
			continue;
		}
		// Source 127.1.0.1 + (n % addrs): a port range per source address.
		src.sin_addr.s_addr = htonl(0x7f010001u + (unsigned)(n++ % (unsigned long)opt_addrs));
		setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
		if (bind(fd, (struct sockaddr *)&src, sizeof(src)) < 0 ||
		    connect(fd, (struct sockaddr *)&dst, sizeof(dst)) < 0) {
			note_error(errno);
			close(fd);
			if (limit)
				atomic_fetch_sub(&started, 1); // try that one again
			continue;
		}
		atomic_fetch_add(&connected, 1);
		close(fd); // FIN first: the server's socket goes to CLOSE_WAIT
	}
	return NULL;
}

static void *server(void *arg)
{
	char buf[256];

	(void)arg;
	for (;;) {
		int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);

		if (fd < 0) {
			if (atomic_load(&stop_servers))
				break;
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if (errno == EMFILE || errno == ENFILE) {
				note_error(errno);
				usleep(1000);
				continue;
			}
			break; // EINVAL after shutdown() of the listener
		}
		atomic_fetch_add(&accepted, 1);
		// Wait for the client's FIN first, so recv() always runs on a socket already in
		// CLOSE_WAIT: what a tracer sees per connection is then the same every time (a
		// recv() that blocks before the FIN arrives would change the owner/EOF events).
		struct pollfd p = {.fd = fd, .events = POLLRDHUP};

		while (poll(&p, 1, 5000) < 0 && errno == EINTR)
			;
		// Read until EOF (recv() returning 0), then close: CLOSE_WAIT > LAST_ACK.
		for (;;) {
			ssize_t r = recv(fd, buf, sizeof(buf), 0);

			if (r > 0)
				continue;
			if (r < 0 && errno == EINTR)
				continue;
			break;
		}
		close(fd);
		atomic_fetch_add(&completed, 1);
	}
	return NULL;
}

// Raise RLIMIT_NOFILE as far as allowed (EPERM without CAP_SYS_RESOURCE: then holder
// processes share the sockets).
static void raise_nofile(long want)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)want) {
		rl.rlim_cur = rl.rlim_max = (rlim_t)want;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
}

static void holder_error(int err)
{
	long zero = 0;

	atomic_fetch_add(&held[1], 1);
	atomic_compare_exchange_strong(&held[2], &zero, (long)err);
}

static volatile sig_atomic_t holder_stop;

static void on_holder_signal(int sig)
{
	(void)sig;
	holder_stop = 1;
}

// One holder process: makes `quota` connections, each held from both ends: the client
// shutdown(SHUT_WR)s and keeps its socket (FIN_WAIT2, never orphaned, so no FIN timeout ever
// resets it), the server side waits for that FIN and never reads: CLOSE_WAIT. On SIGTERM it
// closes every server socket (CLOSE_WAIT > LAST_ACK), then the client ones.
static void holder(long index, long quota, double per_s)
{
	struct sigaction sa = {.sa_handler = on_holder_signal}; // no SA_RESTART: EINTR
	struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(opt_port)};
	struct sockaddr_in src = {.sin_family = AF_INET, .sin_port = 0};
	int *fds = calloc((size_t)quota * 2, sizeof(int));
	unsigned long k = (unsigned long)index * 7919;
	double t0 = now_s();
	long n = 0;
	int one = 1;

	sigaction(SIGTERM, &sa, NULL);
	prctl(PR_SET_PDEATHSIG, SIGTERM);
	dst.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	while (fds && n < quota && !holder_stop) {
		int c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), s;

		if (per_s > 0) { // pace: connection n is due at t0 + n / per_s
			double due = t0 + n / per_s, now = now_s();

			if (due > now)
				usleep((useconds_t)((due - now) * 1e6));
		}
		src.sin_addr.s_addr = htonl(0x7f010001u + (unsigned)(k++ % (unsigned long)opt_addrs));
		setsockopt(c, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
		if (c < 0 || bind(c, (struct sockaddr *)&src, sizeof(src)) < 0 ||
		    connect(c, (struct sockaddr *)&dst, sizeof(dst)) < 0) {
			holder_error(errno);
			if (c >= 0)
				close(c);
			continue;
		}
		shutdown(c, SHUT_WR);
		s = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
		if (s < 0) {
			holder_error(errno);
			close(c);
			continue;
		}
		struct pollfd p = {.fd = s, .events = POLLRDHUP};

		poll(&p, 1, 5000);
		fds[2 * n] = s;
		fds[2 * n + 1] = c;
		n++;
		atomic_fetch_add(&held[0], 1);
	}
	while (!holder_stop)
		pause();
	for (long i = 0; i < n; i++)
		close(fds[2 * i]);
	usleep(500000); // let the LAST_ACKs complete before the client sockets go
	for (long i = 0; i < n; i++)
		close(fds[2 * i + 1]);
	_exit(0);
}

// --hold N: N server sockets in CLOSE_WAIT at once, made by as many holder processes as
// RLIMIT_NOFILE requires (it may not be raisable, e.g. without CAP_SYS_RESOURCE), paced at
// --rate connections/s in all (0: as fast as possible).
static int hold_main(void)
{
	struct rlimit rl;
	long per, procs;
	pid_t *kids;
	double t0, t1, deadline;

	raise_nofile(2 * opt_hold + 1024);
	getrlimit(RLIMIT_NOFILE, &rl);
	if (rl.rlim_cur < rl.rlim_max) { // at least the hard limit
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
		getrlimit(RLIMIT_NOFILE, &rl);
	}
	per = ((long)rl.rlim_cur - 64) / 2; // two descriptors per connection
	if (per < 16)
		per = 16;
	procs = (opt_hold + per - 1) / per;
	held = mmap(NULL, 3 * sizeof(*held), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	kids = calloc((size_t)procs, sizeof(*kids));
	if (held == MAP_FAILED || !kids)
		return 1;
	t0 = now_s();
	for (long i = 0; i < procs; i++) {
		long quota = opt_hold - i * per < per ? opt_hold - i * per : per;

		kids[i] = fork();
		if (kids[i] == 0)
			holder(i, quota, opt_rate > 0 ? opt_rate * (double)quota / opt_hold : 0);
	}
	deadline = now_s() + 60 + (opt_rate > 0 ? opt_hold / opt_rate : 0);
	while (atomic_load(&held[0]) < opt_hold && now_s() < deadline && !atomic_load(&stop_clients))
		usleep(10000);
	t1 = now_s();
	printf("{\"held\": %ld, \"seconds\": %.6f, \"processes\": %ld, \"errors\": %ld, "
	       "\"first_error\": \"%s\"}\n",
	       atomic_load(&held[0]), t1 - t0, procs, atomic_load(&held[1]),
	       atomic_load(&held[2]) ? strerror((int)atomic_load(&held[2])) : "");
	fflush(stdout);
	// Hold until stdin closes or SIGINT/SIGTERM.
	while (!atomic_load(&stop_clients)) {
		struct pollfd p = {.fd = 0, .events = POLLIN};
		char c[64];

		if (poll(&p, 1, 200) > 0 && read(0, c, sizeof(c)) <= 0)
			break;
	}
	for (long i = 0; i < procs; i++)
		kill(kids[i], SIGTERM);
	for (long i = 0; i < procs; i++)
		waitpid(kids[i], NULL, 0);
	close(listen_fd);
	return 0;
}

static void on_signal(int sig)
{
	(void)sig;
	atomic_store(&stop_clients, 1);
}

static void usage(FILE *f)
{
	fprintf(f,
		"usage: churn [--port P] [--seconds S | --count N | --hold N] [--clients N]\n"
		"             [--servers N] [--addrs N] [--drain-ms MS]\n"
		"  --port P      listen on 127.0.0.1:P (default 47999)\n"
		"  --seconds S   run for S seconds (default 5)\n"
		"  --count N     make exactly N connections instead\n"
		"  --hold N      leave N server sockets in CLOSE_WAIT, print {\"held\":N}, wait for\n"
		"                stdin EOF or SIGTERM, then close them\n"
		"  --rate R      with --hold: make R connections/s in all (default: unpaced)\n"
		"  --clients N   connecting threads (default 2)\n"
		"  --servers N   accepting threads (default 2)\n"
		"  --addrs N     client source addresses 127.1.0.1.. (default 32)\n"
		"  --drain-ms MS wait at most this long for open connections at the end (3000)\n");
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{"port", required_argument, 0, 'p'},    {"seconds", required_argument, 0, 's'},
		{"count", required_argument, 0, 'n'},   {"hold", required_argument, 0, 'H'},
		{"clients", required_argument, 0, 'c'}, {"servers", required_argument, 0, 'S'},
		{"addrs", required_argument, 0, 'a'},   {"drain-ms", required_argument, 0, 'd'},
		{"rate", required_argument, 0, 'r'},    {"help", no_argument, 0, 'h'},
		{0, 0, 0, 0},
	};
	struct sockaddr_in addr = {.sin_family = AF_INET};
	pthread_t *cl, *sv;
	double t0, t1, waited;
	int opt, one = 1;

	while ((opt = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
		switch (opt) {
		case 'p': opt_port = atoi(optarg); break;
		case 's': opt_seconds = atof(optarg); break;
		case 'n': opt_count = atol(optarg); break;
		case 'H': opt_hold = atol(optarg); break;
		case 'c': opt_clients = atoi(optarg); break;
		case 'S': opt_servers = atoi(optarg); break;
		case 'a': opt_addrs = atoi(optarg); break;
		case 'd': opt_drain_ms = atoi(optarg); break;
		case 'r': opt_rate = atof(optarg); break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (opt_port <= 0 || opt_port > 65535 || opt_clients < 1 || opt_servers < 1 ||
	    opt_addrs < 1 || opt_addrs > 65000 || (opt_count && opt_hold)) {
		usage(stderr);
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);

	listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	addr.sin_port = htons(opt_port);
	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(listen_fd, (struct sockaddr *)&addr, sizeof(addr)) < 0 ||
	    listen(listen_fd, 4096) < 0) {
		fprintf(stderr, "churn: cannot listen on 127.0.0.1:%d: %s\n", opt_port,
			strerror(errno));
		return 1;
	}

	if (opt_hold)
		return hold_main();
	cl = calloc((size_t)opt_clients, sizeof(*cl));
	sv = calloc((size_t)opt_servers, sizeof(*sv));
	for (int i = 0; i < opt_servers; i++)
		pthread_create(&sv[i], NULL, server, NULL);
	t0 = now_s();
	for (long i = 0; i < opt_clients; i++)
		pthread_create(&cl[i], NULL, client, (void *)(i * 7919));

	if (!opt_count) {
		// Timed run: sleep in slices so SIGINT/SIGTERM end it early too.
		while (!atomic_load(&stop_clients) && now_s() - t0 < opt_seconds)
			usleep(10000);
		atomic_store(&stop_clients, 1);
	}
	for (int i = 0; i < opt_clients; i++)
		pthread_join(cl[i], NULL);
	t1 = now_s();

	// Every connection the clients opened is finished by the servers before we report.
	waited = 0;
	long target = atomic_load(&connected);
	while (atomic_load(&completed) < target && waited * 1000 < opt_drain_ms) {
		usleep(1000);
		waited += 0.001;
	}
	atomic_store(&stop_servers, 1);
	shutdown(listen_fd, SHUT_RDWR); // wakes the accept()s with EINVAL
	for (int i = 0; i < opt_servers; i++)
		pthread_join(sv[i], NULL);
	close(listen_fd);
	// The last server FIN's ACK arrives from the client's timewait socket at once on loopback;
	// give softirqs a moment so LAST_ACK>CLOSE of the last connections has happened.
	usleep(50000);

	{
		long done = atomic_load(&completed);

		printf("{\"connections\": %ld, \"seconds\": %.6f, \"rate\": %.1f, \"connected\": %ld, "
		       "\"errors\": %ld, \"first_error\": \"%s\", \"drain_s\": %.3f}\n",
		       done, t1 - t0, done / (t1 - t0), target, atomic_load(&errors),
		       atomic_load(&first_errno) ? strerror(atomic_load(&first_errno)) : "", waited);
	}
	return 0;
}
