// A data-path load for scripts/bench_data: --pairs loopback TCP connections, each a client
// thread that sends --bytes and waits for them to come back, and an echo thread; for
// --seconds. No connection is opened or closed while it counts, so a tracer's state programs
// never run: what it costs is its per-send/recv hooks. Prints one JSON line.
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_PAIRS 64
#define MAX_BYTES 65536

static int pairs = 2, port = 18555, bytes = 1;
static double seconds = 5.0;
static atomic_int stop;
static pthread_barrier_t start; // the pingers and main: counting starts when all are connected
static long trips[MAX_PAIRS];

static void die(const char *what)
{
	fprintf(stderr, "pingpong: %s: %s\n", what, strerror(errno));
	exit(1);
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

// All n bytes, or -1 (peer gone or error).
static int xfer(int fd, char *buf, int n, int sending)
{
	for (int done = 0; done < n;) {
		ssize_t r = sending ? send(fd, buf + done, n - done, 0) : recv(fd, buf + done, n - done, 0);

		if (r <= 0)
			return -1;
		done += (int)r;
	}
	return 0;
}

static void *echo(void *arg)
{
	int fd = (int)(long)arg;
	char *buf = malloc(bytes);

	while (buf && xfer(fd, buf, bytes, 0) == 0 && xfer(fd, buf, bytes, 1) == 0)
		;
	free(buf);
	close(fd);
	return NULL;
}

static int connected(void)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
	int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;

	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof(a)))
		die("connect");
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	return fd;
}

struct pinger {
	int fd;
	int idx;
};

static void *pinger(void *arg)
{
	struct pinger *p = arg;
	char *buf = calloc(1, bytes);

	if (!buf)
		die("calloc");
	pthread_barrier_wait(&start);
	while (!atomic_load(&stop)) {
		if (xfer(p->fd, buf, bytes, 1) || xfer(p->fd, buf, bytes, 0))
			die("ping-pong");
		trips[p->idx]++;
	}
	free(buf);
	shutdown(p->fd, SHUT_WR);
	return NULL;
}

static void usage(void)
{
	fprintf(stderr, "usage: pingpong [--pairs N] [--seconds S] [--bytes B] [--port P]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	for (int i = 1; i < argc; i++) {
		if (i + 1 >= argc)
			usage();
		if (!strcmp(argv[i], "--pairs"))
			pairs = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--seconds"))
			seconds = atof(argv[++i]);
		else if (!strcmp(argv[i], "--bytes"))
			bytes = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--port"))
			port = atoi(argv[++i]);
		else
			usage();
	}
	if (pairs < 1 || pairs > MAX_PAIRS || bytes < 1 || bytes > MAX_BYTES || seconds <= 0 ||
	    port < 1 || port > 65535)
		usage();

	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
	int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;

	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (ls < 0 || bind(ls, (struct sockaddr *)&a, sizeof(a)) || listen(ls, MAX_PAIRS))
		die("listen");

	pthread_t pt[MAX_PAIRS], et[MAX_PAIRS];
	struct pinger p[MAX_PAIRS];

	pthread_barrier_init(&start, NULL, pairs + 1);

	for (int i = 0; i < pairs; i++) {
		p[i].fd = connected();
		p[i].idx = i;
		int fd = accept(ls, NULL, NULL);

		if (fd < 0)
			die("accept");
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		if (pthread_create(&et[i], NULL, echo, (void *)(long)fd) ||
		    pthread_create(&pt[i], NULL, pinger, &p[i]))
			die("pthread_create");
	}
	pthread_barrier_wait(&start);
	double t0 = now_s();
	struct timespec ts = {(time_t)seconds, (long)((seconds - (time_t)seconds) * 1e9)};

	nanosleep(&ts, NULL);
	atomic_store(&stop, 1);
	for (int i = 0; i < pairs; i++)
		pthread_join(pt[i], NULL);
	double took = now_s() - t0;
	long sum = 0;

	for (int i = 0; i < pairs; i++) {
		pthread_join(et[i], NULL);
		close(p[i].fd);
		sum += trips[i];
	}
	close(ls);
	printf("{\"round_trips\": %ld, \"seconds\": %.6f, \"rate\": %.1f, \"pairs\": %d, "
	       "\"bytes\": %d}\n", sum, took, sum / took, pairs, bytes);
	return 0;
}
