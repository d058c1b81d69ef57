/*
 * spialloc.c - the chunked send/collect loop behind spialloc._native.
 *
 * Why chunks work: the kernel runs every request of one sendmsg() inside
 * that call (xfrm_netlink_rcv under xfrm_cfg_mutex) and queues one reply per
 * request before sendmsg() returns.  So once sendmsg() is back, each reply
 * is either in our receive queue or was dropped for lack of room, and a
 * non-blocking drain that hits EAGAIN with requests unanswered has found
 * lost replies, not slow ones.  The caller keeps @chunk below what the
 * receive buffer holds so that this does not happen.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <time.h>
#include <arpa/inet.h>
#include <sys/socket.h>
#include "spialloc.h"

#define ALIGN4(n)	(((n) + 3u) & ~3u)
#define MSG_MIN_OFF	(NLMSG_HDRLEN + offsetof(struct xfrm_userspi_info, min))
#define MSG_MAX_OFF	(NLMSG_HDRLEN + offsetof(struct xfrm_userspi_info, max))
#define MSG_SEQ_OFF	offsetof(struct nlmsghdr, nlmsg_seq)

_Static_assert(XFRMA_MARK == 21 && XFRMA_IF_ID == 31,
	       "uapi XFRMA_* numbering differs from the ABI we extend");

static int fail(int err)
{
	errno = err;
	return -1;
}

/* Buffers come from Python with no alignment promise: copy headers out. */
static struct nlmsghdr read_hdr(const uint8_t *p)
{
	struct nlmsghdr h;

	memcpy(&h, p, sizeof(h));
	return h;
}

/**
 * init_common - check the fields both kinds of batch share, reset progress
 * @b: batch
 * @msg_max: largest message, padded, that build_chunk() will copy
 *
 * Return: 0, or -1 with errno EINVAL (bad field) or EMSGSIZE (buffer small).
 */
static int init_common(struct spialloc_batch *b, uint32_t msg_max)
{
	uint32_t i;

	if (!b->tmpl || !b->errs || !b->sendbuf || !b->recvbuf || b->chunk == 0)
		return fail(EINVAL);
	if (b->sendbuf_len / msg_max < b->chunk ||
	    b->recvbuf_len < SPIALLOC_RECV_SLOT)
		return fail(EMSGSIZE);
	for (i = 0; i < b->count; i++)
		b->errs[i] = SPIALLOC_PENDING;
	if (b->errmsg && b->errmsg_len)
		b->errmsg[0] = '\0';
	b->sent = b->received = b->overruns = b->strays = b->malformed = 0;
	b->pending = b->settled = 0;
	b->stop = 0;
	return 0;
}

/**
 * spialloc_batch_init_allocspi - validate an ALLOCSPI batch and reset it
 * @b: batch with @tmpl holding exactly one XFRM_MSG_ALLOCSPI message
 *
 * The template must not ask for NLM_F_ACK: a success would then queue two
 * replies (NEWSA and ack), twice what @chunk was sized for.
 *
 * Return: 0, or -1 with errno EINVAL or EMSGSIZE.
 */
int spialloc_batch_init_allocspi(struct spialloc_batch *b)
{
	struct nlmsghdr h;
	uint32_t i;

	if (!b->tmpl || !b->spis || b->stride != 0 ||
	    b->tmpl_len < NLMSG_HDRLEN + sizeof(struct xfrm_userspi_info) ||
	    !b->mins != !b->maxs)
		return fail(EINVAL);
	h = read_hdr(b->tmpl);
	if (h.nlmsg_len != b->tmpl_len || h.nlmsg_type != XFRM_MSG_ALLOCSPI ||
	    !(h.nlmsg_flags & NLM_F_REQUEST) || (h.nlmsg_flags & NLM_F_ACK))
		return fail(EINVAL);
	if (b->tmpl_len > UINT32_MAX - 3)
		return fail(EMSGSIZE);
	if (init_common(b, ALIGN4(b->tmpl_len)) < 0)
		return -1;
	for (i = 0; i < b->count; i++)
		b->spis[i] = 0;
	return 0;
}

/**
 * delsa_msg_len - length of DELSA message @i, or 0 if it is unusable
 * @b: batch
 * @i: message index
 *
 * Checked at init and again when copying: the bytes are the caller's.
 */
static uint32_t delsa_msg_len(const struct spialloc_batch *b, uint32_t i)
{
	struct nlmsghdr h = read_hdr(b->tmpl + (size_t)i * b->stride);

	if (h.nlmsg_len < NLMSG_HDRLEN + sizeof(struct xfrm_usersa_id) ||
	    h.nlmsg_len > b->stride || h.nlmsg_type != XFRM_MSG_DELSA ||
	    (h.nlmsg_flags & (NLM_F_REQUEST | NLM_F_ACK)) !=
	    (NLM_F_REQUEST | NLM_F_ACK))
		return 0;
	return h.nlmsg_len;
}

/**
 * spialloc_batch_init_delsa - validate a DELSA batch and reset it
 * @b: batch with @count XFRM_MSG_DELSA messages, @stride bytes apart
 *
 * Every message must carry NLM_F_ACK, or a successful delete would send
 * no reply and look lost.  @spis, @mins and @maxs must be NULL.
 *
 * Return: 0, or -1 with errno EINVAL or EMSGSIZE.
 */
int spialloc_batch_init_delsa(struct spialloc_batch *b)
{
	uint32_t i;

	if (!b->tmpl || b->spis || b->mins || b->maxs || b->stride % 4 ||
	    b->stride < NLMSG_HDRLEN + sizeof(struct xfrm_usersa_id))
		return fail(EINVAL);
	if ((uint64_t)b->count * b->stride > b->tmpl_len)
		return fail(EMSGSIZE);
	for (i = 0; i < b->count; i++)
		if (!delsa_msg_len(b, i))
			return fail(EINVAL);
	return init_common(b, b->stride);
}

/**
 * build_chunk - copy requests [sent, sent + n) into sendbuf, patched
 * @b: batch
 * @n: number of requests
 *
 * Return: bytes written, or -1 with errno EMSGSIZE/EINVAL (never overflows).
 */
static long build_chunk(struct spialloc_batch *b, uint32_t n)
{
	uint8_t *p = b->sendbuf, *end = b->sendbuf + b->sendbuf_len;
	const uint8_t *src;
	uint32_t i, idx, seq, len;

	for (i = 0; i < n; i++) {
		idx = b->sent + i;
		if (b->stride) {
			src = b->tmpl + (size_t)idx * b->stride;
			len = delsa_msg_len(b, idx);
			if (!len)
				return fail(EINVAL);
		} else {
			src = b->tmpl;
			len = b->tmpl_len;
		}
		if (ALIGN4(len) > (size_t)(end - p))
			return fail(EMSGSIZE);
		memcpy(p, src, len);
		memset(p + len, 0, ALIGN4(len) - len);
		seq = b->seq0 + idx;
		memcpy(p + MSG_SEQ_OFF, &seq, sizeof(seq));
		if (b->mins) {
			memcpy(p + MSG_MIN_OFF, &b->mins[idx], sizeof(uint32_t));
			memcpy(p + MSG_MAX_OFF, &b->maxs[idx], sizeof(uint32_t));
		}
		p += ALIGN4(len);
	}
	return p - b->sendbuf;
}

/**
 * send_chunk - hand @len bytes of requests to the kernel in one datagram
 * @b: batch
 * @len: bytes in sendbuf
 *
 * A netlink datagram to the kernel is taken whole or not at all, and the
 * kernel never waits interruptibly on this path, so an EINTR can only come
 * before anything was processed and is safe to retry.  EMSGSIZE means the chunk exceeds SO_SNDBUF: nothing was
 * sent, the caller may lower @chunk and step again.
 */
static int send_chunk(struct spialloc_batch *b, size_t len)
{
	struct sockaddr_nl kernel = { .nl_family = AF_NETLINK };
	struct iovec iov = { .iov_base = b->sendbuf, .iov_len = len };
	struct msghdr mh = {
		.msg_name = &kernel, .msg_namelen = sizeof(kernel),
		.msg_iov = &iov, .msg_iovlen = 1,
	};
	ssize_t r;

	do
		r = sendmsg(b->fd, &mh, 0);
	while (r < 0 && errno == EINTR);
	if (r < 0)
		return -1;
	return (size_t)r == len ? 0 : fail(EIO);
}

static uint32_t settle(struct spialloc_batch *b, uint32_t idx, int32_t err)
{
	b->errs[idx] = err;
	b->received++;
	if (b->pending)	/* tests feed replies without sending */
		b->pending--;
	return 1;
}

/**
 * save_text - keep the ext-ack message of the first error that has one
 * @b: batch
 * @flags: nlmsg_flags of the NLMSG_ERROR
 * @p: its payload (struct nlmsgerr, maybe the request, then attributes)
 * @plen: payload length, >= sizeof(struct nlmsgerr)
 *
 *   +-------+-----------------------+----------------------------------+
 *   | error | request nlmsghdr (16) | request payload unless CAPPED    |
 *   +-------+-----------------------+----------------------------------+
 *   | nlattr NLMSGERR_ATTR_MSG "No SPI available..." | other TLVs ...  |
 *   +------------------------------------------------+-----------------+
 */
static void save_text(struct spialloc_batch *b, uint16_t flags,
		      const uint8_t *p, uint32_t plen)
{
	struct nlmsghdr orig = read_hdr(p + sizeof(int));
	struct nlattr a;
	uint64_t off;
	uint32_t n;

	if (!b->errmsg || b->errmsg_len < 2 || b->errmsg[0] ||
	    !(flags & NLM_F_ACK_TLVS))
		return;
	off = flags & NLM_F_CAPPED ? sizeof(struct nlmsgerr)
				   : sizeof(int) + (uint64_t)orig.nlmsg_len;
	/* not ALIGN4(): its ~3u mask is 32 bits wide and would clear the high
	 * half of a 64-bit offset (a forged nlmsg_len near 4 GiB wraps to 0) */
	for (off = (off + 3) & ~(uint64_t)3;
	     plen >= NLA_HDRLEN && off <= plen - NLA_HDRLEN;
	     off += NLA_ALIGN(a.nla_len)) {
		memcpy(&a, p + off, sizeof(a));
		if (a.nla_len < NLA_HDRLEN || a.nla_len > plen - off)
			return;
		if ((a.nla_type & NLA_TYPE_MASK) != NLMSGERR_ATTR_MSG)
			continue;
		n = a.nla_len - NLA_HDRLEN;
		if (n > b->errmsg_len - 1)
			n = b->errmsg_len - 1;
		memcpy(b->errmsg, p + off + NLA_HDRLEN, n);
		b->errmsg[n] = '\0';	/* the text's own NUL may be cut off */
		return;
	}
}

/**
 * handle_msg - match one reply to its request and record the outcome
 * @b: batch
 * @h: its header
 * @p: its payload, @plen bytes (already bounds-checked)
 *
 * Return: 1 if a pending request was settled, else 0.
 */
static uint32_t handle_msg(struct spialloc_batch *b, const struct nlmsghdr *h,
			   const uint8_t *p, uint32_t plen)
{
	uint32_t idx = h->nlmsg_seq - b->seq0;	/* wraps like the seqs */
	struct xfrm_usersa_info sa;
	struct nlmsgerr e;

	if (h->nlmsg_pid != b->portid || idx >= b->sent ||
	    b->errs[idx] != SPIALLOC_PENDING)
		goto stray;
	if (h->nlmsg_type == XFRM_MSG_NEWSA && !b->stride) {
		if (plen < sizeof(sa))
			goto malformed;
		memcpy(&sa, p, sizeof(sa));
		b->spis[idx] = ntohl(sa.id.spi);
		return settle(b, idx, 0);
	}
	if (h->nlmsg_type != NLMSG_ERROR)
		goto stray;
	if (plen < sizeof(e))
		goto malformed;
	memcpy(&e, p, sizeof(e));
	if (e.error > 0 || e.error == -2147483647 - 1)
		goto malformed;
	if (e.error == 0 && !b->stride)	/* ALLOCSPI succeeds with NEWSA only */
		goto stray;
	if (e.error)
		save_text(b, h->nlmsg_flags, p, plen);
	return settle(b, idx, -e.error);
stray:
	b->strays++;
	return 0;
malformed:
	b->malformed++;
	return 0;
}

/**
 * spialloc_batch_feed - process one received datagram
 * @b: batch
 * @buf: datagram bytes
 * @len: bytes received
 * @src_pid: sender's port id (0 = kernel)
 * @truncated: MSG_TRUNC was set: the datagram did not fit its slot
 *
 * Walks every message of the datagram; exposed so tests can feed bytes.
 * A truncated datagram is skipped whole: its request stays pending and ends
 * LOST, which is the safe reading of a reply we could not fully see.
 *
 * Return: number of requests settled.
 */
uint32_t spialloc_batch_feed(struct spialloc_batch *b, const uint8_t *buf,
			     uint32_t len, uint32_t src_pid, int truncated)
{
	struct nlmsghdr h;
	uint32_t done = 0;

	if (truncated) {
		b->malformed++;
		return 0;
	}
	if (src_pid != 0) {
		b->strays++;
		return 0;
	}
	while (len >= NLMSG_HDRLEN) {
		h = read_hdr(buf);
		if (h.nlmsg_len < NLMSG_HDRLEN || h.nlmsg_len > len) {
			b->malformed++;
			return done;
		}
		done += handle_msg(b, &h, buf + NLMSG_HDRLEN,
				   h.nlmsg_len - NLMSG_HDRLEN);
		if (NLMSG_ALIGN(h.nlmsg_len) >= len)
			return done;
		buf += NLMSG_ALIGN(h.nlmsg_len);
		len -= NLMSG_ALIGN(h.nlmsg_len);
	}
	if (len)
		b->malformed++;
	return done;
}

/**
 * recv_some - one non-blocking recvmmsg() into the recvbuf slots
 * @b: batch
 *
 * Return: datagrams received (> 0), or -1 with errno (EAGAIN: queue empty).
 */
static int recv_some(struct spialloc_batch *b)
{
	struct mmsghdr mm[SPIALLOC_RECV_BATCH];
	struct iovec iov[SPIALLOC_RECV_BATCH];
	uint32_t i, slots = b->recvbuf_len / SPIALLOC_RECV_SLOT;
	int n;

	if (slots > SPIALLOC_RECV_BATCH)
		slots = SPIALLOC_RECV_BATCH;
	memset(mm, 0, sizeof(mm[0]) * slots);
	for (i = 0; i < slots; i++) {
		iov[i].iov_base = b->recvbuf + (size_t)i * SPIALLOC_RECV_SLOT;
		iov[i].iov_len = SPIALLOC_RECV_SLOT;
		mm[i].msg_hdr.msg_iov = &iov[i];
		mm[i].msg_hdr.msg_iovlen = 1;
	}
	n = recvmmsg(b->fd, mm, slots, MSG_DONTWAIT, NULL);
	/* No sender addresses asked for: the socket is connected to the
	 * kernel (see the header), so every datagram is the kernel's. */
	for (i = 0; n > 0 && i < (uint32_t)n; i++)
		spialloc_batch_feed(b, iov[i].iov_base, mm[i].msg_len, 0,
				    !!(mm[i].msg_hdr.msg_flags & MSG_TRUNC));
	return n;
}

/* Everything sent but unanswered has had its reply dropped. */
static void mark_lost(struct spialloc_batch *b)
{
	uint32_t i;

	for (i = b->settled; i < b->sent; i++)
		if (b->errs[i] == SPIALLOC_PENDING)
			b->errs[i] = SPIALLOC_LOST;
	b->pending = 0;
	b->settled = b->sent;
}

/**
 * collect - read replies until none is pending or the queue is empty
 * @b: batch
 *
 * ENOBUFS (the kernel dropped replies) is counted and reading goes on: the
 * replies queued before the overflow are still there.
 *
 * Return: 0, or -1 with errno on a socket error (requests stay pending).
 */
static int collect(struct spialloc_batch *b)
{
	while (b->pending) {
		if (recv_some(b) >= 0)
			continue;
		if (errno == EAGAIN || errno == EWOULDBLOCK) {
			mark_lost(b);
			return 0;
		}
		if (errno == ENOBUFS)
			b->overruns++;
		else if (errno != EINTR)
			return -1;
	}
	b->settled = b->sent;
	return 0;
}

/**
 * spialloc_batch_step - send one chunk of requests and collect its replies
 * @b: batch, initialised
 *
 * Returns after each chunk so the caller (Python) can run signal handlers.
 * A failure leaves the batch consistent: sendmsg() failing sends nothing;
 * a receive error leaves the chunk pending for spialloc_batch_drain().
 *
 * Return: 1 if requests remain, 0 when done, -1 with errno on error.
 */
int spialloc_batch_step(struct spialloc_batch *b)
{
	uint32_t n = b->count - b->sent;
	long len;

	if (b->pending && collect(b) < 0)	/* left over by a failed step */
		return -1;
	if (b->stop || n == 0)
		return 0;
	if (n > b->chunk)
		n = b->chunk;
	len = build_chunk(b, n);
	if (len < 0 || send_chunk(b, len) < 0)
		return -1;
	b->sent += n;
	b->pending += n;
	if (collect(b) < 0)
		return -1;
	return b->sent < b->count;
}

/**
 * spialloc_batch_drain - stop sending and settle every request sent
 * @b: batch
 *
 * After this, errs[i] is final for every i < sent (answered or LOST) and
 * SPIALLOC_PENDING for the rest, which were never sent.  On a socket error
 * the unanswered requests are marked LOST anyway, as they may exist.
 *
 * Return: 0, or -1 with errno if the socket failed while draining.
 */
int spialloc_batch_drain(struct spialloc_batch *b)
{
	int err;

	b->stop = 1;
	if (collect(b) == 0)
		return 0;
	err = errno;
	mark_lost(b);
	return fail(err);
}

/*
 * round_trip - send @len bytes of @tmpl as ALLOCSPI @seq for [@lo, @hi] on
 * @fd and read the one datagram the kernel queued in answer (see
 * spialloc_alloc_one() for the return value)
 */
static int64_t round_trip(struct spialloc_one *o, int fd, const void *tmpl,
			  uint32_t len, uint32_t seq, uint32_t lo, uint32_t hi)
{
	struct nlmsghdr h;
	uint32_t spi;
	ssize_t n;

	if (len < MSG_MAX_OFF + 4 || len > SPIALLOC_ONE_MAX || !o->rbuf) {
		errno = EINVAL;
		return SPIALLOC_ONE_FAILED;
	}
	memcpy(o->scratch, tmpl, len);
	memcpy(o->scratch + MSG_SEQ_OFF, &seq, 4);
	memcpy(o->scratch + MSG_MIN_OFF, &lo, 4);
	memcpy(o->scratch + MSG_MAX_OFF, &hi, 4);
	do
		n = send(fd, o->scratch, len, 0);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return SPIALLOC_ONE_FAILED;
	do
		n = recv(fd, o->rbuf, o->rlen, MSG_DONTWAIT);
	while (n < 0 && errno == EINTR);
	if (n < 0) {
		o->got = -errno;
		return SPIALLOC_ONE_OTHER;
	}
	o->got = n;
	if ((size_t)n < NLMSG_HDRLEN + sizeof(struct xfrm_usersa_info))
		return SPIALLOC_ONE_OTHER;
	h = read_hdr(o->rbuf);
	if (h.nlmsg_type != XFRM_MSG_NEWSA || h.nlmsg_seq != seq ||
	    h.nlmsg_pid != o->portid || h.nlmsg_len != (uint32_t)n)
		return SPIALLOC_ONE_OTHER;
	memcpy(&spi, o->rbuf + NLMSG_HDRLEN +
	       offsetof(struct xfrm_usersa_info, id.spi), 4);
	return ntohl(spi);
}

/**
 * spialloc_alloc_one - one ALLOCSPI round trip, for the single allocate
 * @o:       the socket's struct spialloc_one (buffers, port id, results)
 * @fd:      NETLINK_XFRM socket connected to the kernel (passed per call:
 *           Python's closed socket is -1)
 * @tmpl:    one ALLOCSPI message (as for a batch); copied, not changed
 * @len:     its length, at most SPIALLOC_ONE_MAX
 * @seq:     nlmsg_seq to send it with
 * @lo, @hi: SPI range to patch in, host order
 *
 * Why: one Python-level call instead of a bytearray copy, struct packing,
 * send(), recvfrom_into() and header parsing, each an object or two.  The
 * kernel answers inside send(), so one non-blocking read finds the reply.
 * Only the common case is decided here: anything but our NEWSA (an error,
 * a stray reply, a dropped one) goes back to Python with what was read.
 * The caller holds the socket's (Python) lock.
 *
 * Return: the SPI, host order (0 to 2^32 - 1: the return value carries it,
 * so Python reads no struct field on its common path); SPIALLOC_ONE_OTHER
 * (see @o->got; Python takes over); or SPIALLOC_ONE_FAILED with errno if
 * send() failed (nothing was sent).
 */
int64_t spialloc_alloc_one(struct spialloc_one *o, int fd, const char *tmpl,
			   uint32_t len, uint32_t seq, uint32_t lo, uint32_t hi)
{
	return round_trip(o, fd, tmpl, len, seq, lo, hi);
}

/*
 * The calling thread, as a token for @busy: the address of a thread-local
 * (no syscall, unlike gettid()).  @last is this thread's latest SPI from
 * spialloc_alloc_req(), for a caller that an exception (a signal handler's,
 * raised as the call returns) left before it stored it: only the thread
 * that made the call reads it, so no other call can overwrite it.
 */
static __thread struct {
	char me;
	const struct spialloc_one *o;
	uint32_t seq;
	int64_t spi;
} self_;

static uintptr_t me(void)
{
	return (uintptr_t)&self_.me;
}

/**
 * spialloc_alloc_req - spialloc_alloc_one() on @o's own socket, with no lock
 * in Python
 * @o:   struct spialloc_one of a socket used by nothing else (@o->fd)
 * @r:   the request, prepared once
 * @seq: nlmsg_seq to send it with
 *
 * Why: Python's lock around spialloc_alloc_one() and its seven converted
 * arguments cost about a third of what a single allocate adds to the
 * kernel's own work.  Here the socket is taken with one compare-and-swap
 * that never waits (a thread that finds it taken goes the locked way on
 * the other socket), inside one C call that no Python exception can cut in
 * two, and given back before returning, except after SPIALLOC_ONE_OTHER:
 * the reply in @o->rbuf is then Python's to read until it calls
 * spialloc_one_release().
 *
 * Return: as spialloc_alloc_one(), or SPIALLOC_ONE_BUSY (nothing sent).
 */
int64_t spialloc_alloc_req(struct spialloc_one *o, const struct spialloc_req *r,
			   uint32_t seq)
{
	uintptr_t free_ = 0;
	int64_t ret;

	if (!__atomic_compare_exchange_n(&o->busy, &free_, me(), 0,
					 __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
		return SPIALLOC_ONE_BUSY;
	if (o->fd < 0) {
		errno = EBADF;
		ret = SPIALLOC_ONE_FAILED;
	} else {
		ret = round_trip(o, o->fd, r->msg, r->len, seq, r->lo, r->hi);
	}
	if (ret >= 0) {
		self_.o = o;
		self_.seq = seq;
		self_.spi = ret;
	}
	if (ret != SPIALLOC_ONE_OTHER)
		__atomic_store_n(&o->busy, 0, __ATOMIC_RELEASE);
	return ret;
}

/**
 * spialloc_one_last - the SPI this thread's spialloc_alloc_req(@o, .., @seq)
 * returned, or -1 if this thread's latest successful call was another
 */
int64_t spialloc_one_last(const struct spialloc_one *o, uint32_t seq)
{
	return self_.o == o && self_.seq == seq ? self_.spi : -1;
}

/**
 * spialloc_one_held - whether this thread holds @o's socket (after
 * SPIALLOC_ONE_OTHER, until spialloc_one_release())
 */
int spialloc_one_held(const struct spialloc_one *o)
{
	return __atomic_load_n(&o->busy, __ATOMIC_ACQUIRE) == me();
}

/**
 * spialloc_one_release - give @o's socket back, if this thread holds it
 */
void spialloc_one_release(struct spialloc_one *o)
{
	uintptr_t mine = me();

	__atomic_compare_exchange_n(&o->busy, &mine, 0, 0, __ATOMIC_RELEASE,
				    __ATOMIC_RELAXED);
}

/**
 * spialloc_one_close - no spialloc_alloc_req() on @o uses its socket after
 * this returns (@o->fd is -1): the caller may then close the socket
 *
 * Waits for a call in flight (the GIL is released meanwhile), but not for
 * this thread's own hold: a close() from a signal handler that interrupted
 * this thread's slow path would wait for itself.
 */
void spialloc_one_close(struct spialloc_one *o)
{
	const struct timespec pause = { 0, 50000 };
	uintptr_t free_;

	for (;;) {
		free_ = 0;
		if (__atomic_compare_exchange_n(&o->busy, &free_, me(), 0,
						__ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
			break;
		if (free_ == me()) {
			o->fd = -1;
			return;
		}
		nanosleep(&pause, NULL);
	}
	o->fd = -1;
	__atomic_store_n(&o->busy, 0, __ATOMIC_RELEASE);
}
