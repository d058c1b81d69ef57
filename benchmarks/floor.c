/*
 * floor.c - the kernel floor for XFRM_MSG_ALLOCSPI: the least a program can
 * do per SPI.  Not part of spialloc; the benchmark compiles it at run time
 * (cc -O2) and runs it inside its own network namespace.
 *
 * Every request of a run is built before the clock starts (same bytes as
 * spialloc's template: ESP, transport, reqid 0, saddr 0, no attributes; only
 * nlmsg_seq differs), so the timed region is syscalls and reply parsing only:
 *
 *   single  one request per send(), then one recv()
 *   batch   BATCH requests in one send(), then BATCH recv()s
 *   fill    like batch, but the states are kept (pre-filling the table)
 *
 * After the timed region the allocated states are deleted (DELSA, batched,
 * acked) unless KEEP is 1, so the table stays as it was.
 *
 * Usage:
 *   floor MODE COUNT BATCH DADDR MIN MAX KEEP    one run, prints a result line
 *   floor serve                                   the same, one run per stdin line
 *   floor template DADDR MIN MAX                   prints request 0 as hex
 * Result line: "ns=WALL cpu=CPU ok=N err=N lost=N deleted=N errno=FIRST_ERRNO":
 * WALL is CLOCK_MONOTONIC, CPU is CLOCK_THREAD_CPUTIME_ID (user + system time
 * of this process, which is where the kernel does ALLOCSPI: inside send()),
 * both in nanoseconds over the timed region.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/netlink.h>
#include <linux/xfrm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define REQ_LEN NLMSG_LENGTH(sizeof(struct xfrm_userspi_info))
#define DEL_LEN NLMSG_LENGTH(sizeof(struct xfrm_usersa_id))
#define RCVBUF (4 << 20)
#define DEL_BATCH 256

static int fd = -1;
static uint32_t seq_next = 1;
static uint8_t rbuf[1 << 16];

static void die(const char *what)
{
	perror(what);
	exit(2);
}

static int64_t now_ns(clockid_t clock)
{
	struct timespec ts;

	clock_gettime(clock, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void open_socket(void)
{
	struct sockaddr_nl sa = { .nl_family = AF_NETLINK };
	int size = RCVBUF;

	fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_XFRM);
	if (fd < 0)
		die("socket(NETLINK_XFRM)");
	if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(size)) < 0)
		die("SO_RCVBUFFORCE");
	if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof(size)) < 0)
		die("SO_SNDBUFFORCE");
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		die("bind");
}

static void build_request(uint8_t *p, uint32_t seq, uint32_t daddr,
			  uint32_t min, uint32_t max)
{
	struct nlmsghdr *h = (struct nlmsghdr *)p;
	struct xfrm_userspi_info *u = NLMSG_DATA(h);

	memset(p, 0, NLMSG_ALIGN(REQ_LEN));
	h->nlmsg_len = REQ_LEN;
	h->nlmsg_type = XFRM_MSG_ALLOCSPI;
	h->nlmsg_flags = NLM_F_REQUEST;
	h->nlmsg_seq = seq;
	u->info.id.daddr.a4 = daddr;
	u->info.id.proto = IPPROTO_ESP;
	u->info.family = AF_INET;
	u->info.mode = XFRM_MODE_TRANSPORT;
	u->min = min;
	u->max = max;
}

struct result {
	uint32_t ok, err, lost, deleted;
	int first_errno;
};

/* Read one queued reply (never blocks: the kernel answered inside send()).
 * Return: 1 handled, 0 queue empty (reply dropped). */
static int recv_one(uint32_t *spis, struct result *r)
{
	struct nlmsghdr *h;
	ssize_t n;

	for (;;) {
		n = recv(fd, rbuf, sizeof(rbuf), MSG_DONTWAIT);
		if (n >= 0)
			break;
		if (errno == EAGAIN || errno == EWOULDBLOCK)
			return 0;
		if (errno != ENOBUFS && errno != EINTR)
			die("recv");
	}
	for (h = (struct nlmsghdr *)rbuf; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
		if (h->nlmsg_type == XFRM_MSG_NEWSA) {
			struct xfrm_usersa_info *sa = NLMSG_DATA(h);

			spis[r->ok++] = sa->id.spi;	/* network order, as DELSA wants */
		} else if (h->nlmsg_type == NLMSG_ERROR) {
			struct nlmsgerr *e = NLMSG_DATA(h);

			if (e->error) {
				r->err++;
				if (!r->first_errno)
					r->first_errno = -e->error;
			}
		}
	}
	return 1;
}

static void delete_all(const uint32_t *spis, uint32_t count, uint32_t daddr,
		       struct result *r)
{
	static uint8_t dbuf[DEL_BATCH * NLMSG_ALIGN(DEL_LEN)];
	uint32_t done = 0, i, n;

	while (done < count) {
		n = count - done < DEL_BATCH ? count - done : DEL_BATCH;
		memset(dbuf, 0, sizeof(dbuf));
		for (i = 0; i < n; i++) {
			struct nlmsghdr *h = (struct nlmsghdr *)(dbuf + i * NLMSG_ALIGN(DEL_LEN));
			struct xfrm_usersa_id *id = NLMSG_DATA(h);

			h->nlmsg_len = DEL_LEN;
			h->nlmsg_type = XFRM_MSG_DELSA;
			h->nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
			h->nlmsg_seq = seq_next++;
			id->daddr.a4 = daddr;
			id->spi = spis[done + i];
			id->family = AF_INET;
			id->proto = IPPROTO_ESP;
		}
		if (send(fd, dbuf, n * NLMSG_ALIGN(DEL_LEN), 0) < 0)
			die("send DELSA");
		for (i = 0; i < n; i++) {
			ssize_t got = recv(fd, rbuf, sizeof(rbuf), MSG_DONTWAIT);
			struct nlmsghdr *h = (struct nlmsghdr *)rbuf;

			if (got < 0)
				break;
			if (got >= (ssize_t)NLMSG_LENGTH(sizeof(struct nlmsgerr)) &&
			    h->nlmsg_type == NLMSG_ERROR &&
			    ((struct nlmsgerr *)NLMSG_DATA(h))->error == 0)
				r->deleted++;
		}
		done += n;
	}
}

static int run(const char *mode, uint32_t count, uint32_t batch, const char *daddr_s,
	       uint32_t min, uint32_t max, int keep)
{
	struct result r = { 0 };
	uint32_t daddr, i, sent, n, stride = NLMSG_ALIGN(REQ_LEN);
	uint8_t *reqs;
	uint32_t *spis;
	int64_t t0, t1, c0, c1;
	int single = !strcmp(mode, "single");

	if (!single && strcmp(mode, "batch") && strcmp(mode, "fill")) {
		fprintf(stderr, "floor: unknown mode %s\n", mode);
		return -1;
	}
	if (inet_pton(AF_INET, daddr_s, &daddr) != 1 || count == 0) {
		fprintf(stderr, "floor: bad daddr or count\n");
		return -1;
	}
	if (single || batch == 0)
		batch = 1;
	if (!strcmp(mode, "fill"))
		keep = 1;
	reqs = malloc((size_t)count * stride);
	spis = malloc((size_t)count * sizeof(*spis));
	if (!reqs || !spis)
		die("malloc");
	for (i = 0; i < count; i++)	/* prebuilt: nothing is encoded while timed */
		build_request(reqs + (size_t)i * stride, seq_next++, daddr, min, max);

	c0 = now_ns(CLOCK_THREAD_CPUTIME_ID);
	t0 = now_ns(CLOCK_MONOTONIC);
	for (sent = 0; sent < count; sent += n) {
		n = count - sent < batch ? count - sent : batch;
		if (send(fd, reqs + (size_t)sent * stride, (size_t)n * stride, 0) < 0)
			die("send ALLOCSPI");
		for (i = 0; i < n; i++)
			if (!recv_one(spis, &r)) {
				r.lost += n - i;
				break;
			}
	}
	t1 = now_ns(CLOCK_MONOTONIC);
	c1 = now_ns(CLOCK_THREAD_CPUTIME_ID);

	if (!keep)
		delete_all(spis, r.ok, daddr, &r);
	printf("ns=%lld cpu=%lld ok=%u err=%u lost=%u deleted=%u errno=%d\n",
	       (long long)(t1 - t0), (long long)(c1 - c0), r.ok, r.err, r.lost, r.deleted,
	       r.first_errno);
	fflush(stdout);
	free(reqs);
	free(spis);
	return 0;
}

int main(int argc, char **argv)
{
	char line[512], mode[16], daddr[64];
	unsigned long count, batch, min, max;
	int keep;

	if (argc == 5 && !strcmp(argv[1], "template")) {
		uint8_t req[NLMSG_ALIGN(REQ_LEN)];
		uint32_t a;

		if (inet_pton(AF_INET, argv[2], &a) != 1)
			return 1;
		build_request(req, 0, a, strtoul(argv[3], NULL, 0), strtoul(argv[4], NULL, 0));
		for (size_t j = 0; j < REQ_LEN; j++)
			printf("%02x", req[j]);
		printf("\n");
		return 0;
	}
	if (argc == 2 && !strcmp(argv[1], "serve")) {
		open_socket();
		while (fgets(line, sizeof(line), stdin)) {
			if (!strncmp(line, "quit", 4))
				break;
			if (sscanf(line, "%15s %lu %lu %63s %lu %lu %d", mode, &count, &batch,
				   daddr, &min, &max, &keep) != 7 ||
			    run(mode, count, batch, daddr, min, max, keep) < 0) {
				printf("error bad command\n");
				fflush(stdout);
			}
		}
		return 0;
	}
	if (argc == 8) {
		open_socket();
		return run(argv[1], strtoul(argv[2], NULL, 0), strtoul(argv[3], NULL, 0), argv[4],
			   strtoul(argv[5], NULL, 0), strtoul(argv[6], NULL, 0), atoi(argv[7])) < 0;
	}
	fprintf(stderr, "usage: floor MODE COUNT BATCH DADDR MIN MAX KEEP | serve | template DADDR MIN MAX\n");
	return 1;
}
