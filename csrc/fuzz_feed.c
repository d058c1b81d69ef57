/*
 * fuzz_feed.c - libFuzzer target for spialloc_batch_feed(), the C reply parser.
 *
 * Not part of the extension: fuzz/run.sh builds it with
 *   clang -fsanitize=fuzzer,address,undefined csrc/fuzz_feed.c csrc/spialloc.c
 *
 * Each input is treated as received bytes.  The batch it is fed to takes its
 * seq0 and portid from the input's first message header (when there is one),
 * so a real kernel reply from fuzz/corpus/feed/ settles "its" request and the
 * fuzzer starts from the deep paths instead of the stray ones.
 *
 *   input: | nlmsghdr | payload ... | nlmsghdr | payload ... | ...
 *            ^ len type flags seq pid: seq0 = seq - (seq & 3), portid = pid
 *
 * Every input is fed five ways, each to a fresh batch of NREQ requests:
 *   1. ALLOCSPI batch, the whole input as one datagram
 *   2. ALLOCSPI batch, the input split into two datagrams at a point the
 *      input chooses (its last byte), each piece in an exact-size heap copy
 *      so AddressSanitizer sees any read past a datagram
 *   3. ALLOCSPI batch, one datagram per 4-byte-aligned prefix chunk of up to
 *      64 bytes (messages cut anywhere)
 *   4. DELSA batch (acks settle requests), the whole input
 *   5. ALLOCSPI batch with a tiny ext-ack buffer (errmsg_len 1..8)
 * and once with truncated=1 and once from a non-kernel sender, which must
 * settle nothing.  After each feed the batch invariants are checked; a
 * violation aborts, which libFuzzer reports as a crash.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "spialloc.h"

#define NREQ	64

struct harness {
	struct spialloc_batch b;
	uint8_t tmpl[NREQ * 64];
	uint8_t sendbuf[NREQ * 256];
	uint8_t recvbuf[SPIALLOC_RECV_SLOT];
	uint32_t spis[NREQ];
	int32_t errs[NREQ];
	char errmsg[256];
};

static void die(const char *what, const struct spialloc_batch *b)
{
	fprintf(stderr, "fuzz_feed invariant violated: %s (sent %u received %u pending %u strays %u malformed %u)\n",
		what, b->sent, b->received, b->pending, b->strays, b->malformed);
	abort();
}

static void put_hdr(uint8_t *p, uint32_t len, uint16_t type, uint16_t flags, uint32_t seq)
{
	struct nlmsghdr h = { .nlmsg_len = len, .nlmsg_type = type,
			      .nlmsg_flags = flags, .nlmsg_seq = seq };

	memcpy(p, &h, sizeof(h));
}

/* A batch as if all NREQ requests had been sent; errmsg_len 0 = default. */
static void setup(struct harness *t, int delsa, uint32_t seq0, uint32_t portid,
		  uint32_t errmsg_len)
{
	struct spialloc_batch *b = &t->b;
	uint32_t i, one = NLMSG_HDRLEN + sizeof(struct xfrm_usersa_id);

	memset(t, 0, sizeof(*t));
	b->fd = -1;
	b->portid = portid;
	b->count = NREQ;
	b->seq0 = seq0;
	b->chunk = NREQ;
	b->sendbuf = t->sendbuf;
	b->sendbuf_len = sizeof(t->sendbuf);
	b->recvbuf = t->recvbuf;
	b->recvbuf_len = sizeof(t->recvbuf);
	b->errs = t->errs;
	b->errmsg = t->errmsg;
	b->errmsg_len = errmsg_len ? errmsg_len : sizeof(t->errmsg);
	b->tmpl = t->tmpl;
	if (delsa) {
		for (i = 0; i < NREQ; i++)
			put_hdr(t->tmpl + i * one, one, XFRM_MSG_DELSA,
				NLM_F_REQUEST | NLM_F_ACK, 0);
		b->tmpl_len = NREQ * one;
		b->stride = one;
		if (spialloc_batch_init_delsa(b) != 0)
			die("init_delsa", b);
	} else {
		one = NLMSG_HDRLEN + sizeof(struct xfrm_userspi_info);
		put_hdr(t->tmpl, one, XFRM_MSG_ALLOCSPI, NLM_F_REQUEST, 0);
		b->tmpl_len = one;
		b->spis = t->spis;
		if (spialloc_batch_init_allocspi(b) != 0)
			die("init_allocspi", b);
	}
	b->sent = b->pending = NREQ;
}

static void check(const struct harness *t, uint32_t settled_total)
{
	const struct spialloc_batch *b = &t->b;
	uint32_t i, settled = 0;

	for (i = 0; i < NREQ; i++) {
		if (t->errs[i] == SPIALLOC_PENDING)
			continue;
		/* feed only ever records 0 or a positive errno */
		if (t->errs[i] < 0)
			die("negative errs[] other than PENDING", b);
		settled++;
	}
	if (settled != b->received || settled != settled_total)
		die("settled count differs from received / return values", b);
	if (b->received + b->pending != NREQ)
		die("received + pending != sent", b);
	if (memchr(t->errmsg, '\0', b->errmsg_len) == NULL)
		die("errmsg not NUL-terminated inside errmsg_len", b);
}

static uint32_t feed_copy(struct harness *t, const uint8_t *data, size_t len,
			  uint32_t src_pid, int truncated)
{
	uint8_t *copy = malloc(len ? len : 1);
	uint32_t n;

	if (!copy)
		abort();
	memcpy(copy, data, len);
	n = spialloc_batch_feed(&t->b, copy, (uint32_t)len, src_pid, truncated);
	free(copy);
	return n;
}

static struct harness t;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct nlmsghdr h = { 0 };
	uint32_t seq0 = 0x1000, portid = 4242, total, split, off, chunk;

	if (size > 1 << 16)	/* one recv slot is far smaller anyway */
		return 0;
	if (size >= sizeof(h)) {
		memcpy(&h, data, sizeof(h));
		seq0 = h.nlmsg_seq - (h.nlmsg_seq & 3);
		portid = h.nlmsg_pid;
	}

	/* 1. whole input, ALLOCSPI */
	setup(&t, 0, seq0, portid, 0);
	total = spialloc_batch_feed(&t.b, data, (uint32_t)size, 0, 0);
	check(&t, total);

	/* 2. two datagrams */
	setup(&t, 0, seq0, portid, 0);
	split = size ? (uint32_t)(data[size - 1] * 7u) % (uint32_t)(size + 1) : 0;
	total = feed_copy(&t, data, split, 0, 0);
	total += feed_copy(&t, data + split, size - split, 0, 0);
	check(&t, total);

	/* 3. aligned chunks cutting through messages */
	setup(&t, 0, seq0, portid, 0);
	chunk = size ? 4u * (1u + data[0] % 16u) : 4;
	total = 0;
	for (off = 0; off < size; off += chunk)
		total += feed_copy(&t, data + off, size - off < chunk ? size - off : chunk, 0, 0);
	check(&t, total);

	/* 4. DELSA: acks settle */
	setup(&t, 1, seq0, portid, 0);
	total = feed_copy(&t, data, size, 0, 0);
	check(&t, total);

	/* 5. tiny ext-ack buffer */
	setup(&t, 0, seq0, portid, 1 + (size ? data[size / 2] % 8u : 0));
	total = feed_copy(&t, data, size, 0, 0);
	check(&t, total);

	/* truncated, or not from the kernel: nothing settles */
	setup(&t, 0, seq0, portid, 0);
	if (feed_copy(&t, data, size, 0, 1) != 0 || feed_copy(&t, data, size, portid ? portid : 1, 0) != 0)
		die("truncated or foreign datagram settled a request", &t.b);
	check(&t, 0);
	return 0;
}
