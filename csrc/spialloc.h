/*
 * spialloc: batched XFRM_MSG_ALLOCSPI / XFRM_MSG_DELSA over NETLINK_XFRM.
 *
 * The C side only moves bytes: Python encodes one message (or an array of
 * them), C replicates it into a caller-owned send buffer, patches nlmsg_seq
 * (and the SPI range), sends a whole chunk with one sendmsg() and collects
 * the replies with recvmmsg().  No allocation, no global state: everything
 * lives in struct spialloc_batch and the buffers it points to.
 *
 * The socket must be connect()ed to the kernel (nl_pid 0), as XfrmSocket
 * does: the kernel then refuses every other sender's unicast to it
 * (ECONNREFUSED), so a datagram read here is the kernel's and no sender
 * address is read.  Asking recvmmsg() for one cost 1-2% of a batch.
 *
 * One ALLOCSPI request as built by Python (host byte order unless noted):
 *
 *   0        4      6       8        12       16
 *   +--------+------+-------+--------+--------+
 *   | len    | 22   | flags | seq *  | pid 0  |  struct nlmsghdr
 *   +--------+------+-------+--------+--------+
 *   | struct xfrm_usersa_info (224)           |  id.daddr @16+56,
 *   |                                         |  id.proto @16+76 ...
 *   +-------------------+---------------------+
 *   | min * @16+224     | max * @16+228       |  struct xfrm_userspi_info
 *   +-------------------+---------------------+
 *   | attributes: XFRMA_MARK, IF_ID, SA_DIR, SA_PCPU (optional)
 *   +------------------------------------------
 *   (* = patched per request by spialloc_batch_step())
 *
 * Each request gets exactly one reply datagram: XFRM_MSG_NEWSA (SPI in
 * id.spi, network order, @16+72) or NLMSG_ERROR (-errno, ext-ack text).
 */
#ifndef SPIALLOC_H
#define SPIALLOC_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <linux/netlink.h>
#include <linux/xfrm.h>

/*
 * XFRMA_SA_DIR (Linux 6.10) and XFRMA_SA_PCPU (6.13) are members of an enum
 * in the uapi header, so #ifdef cannot tell whether the installed header has
 * them, and build hosts often ship an older header than the kernel they run.
 * Attribute numbers are kernel ABI and never change, so we carry our own.
 * The #ifndef only defers to a macro of the same name defined elsewhere; with
 * a new header our macro shadows the enum member, which has the same value.
 */
#define SPIALLOC_XFRMA_SA_DIR	33
#define SPIALLOC_XFRMA_SA_PCPU	35
#ifndef XFRMA_SA_DIR
#define XFRMA_SA_DIR		SPIALLOC_XFRMA_SA_DIR
#endif
#ifndef XFRMA_SA_PCPU
#define XFRMA_SA_PCPU		SPIALLOC_XFRMA_SA_PCPU
#endif

/* errs[i] values besides 0 (success) and a positive errno */
#define SPIALLOC_PENDING	(-1)	/* not sent yet, or no reply yet */
#define SPIALLOC_LOST		(-2)	/* reply dropped: a larval state may exist */

/* recvbuf is cut into slots of this size, one datagram each; a NEWSA reply
 * is about 270 bytes, a capped error with ext-ack text about 100. */
#define SPIALLOC_RECV_SLOT	1024
/* at most this many slots (datagrams) per recvmmsg() call */
#define SPIALLOC_RECV_BATCH	64

/**
 * struct spialloc_batch - one batch of requests and its results
 *
 * Filled by the caller, checked by spialloc_batch_init_*(), then advanced by
 * spialloc_batch_step().  All pointers are caller-owned and must stay valid
 * until the batch is finished or drained.
 *
 * @fd:          NETLINK_XFRM socket connected to the kernel (blocking or
 *               not: C uses MSG_DONTWAIT)
 * @portid:      the socket's netlink port id (getsockname)
 * @tmpl:        ALLOCSPI: one full message; DELSA: @count messages @stride apart
 * @tmpl_len:    size of @tmpl in bytes
 * @stride:      0 for ALLOCSPI; distance between DELSA messages (multiple of 4)
 * @count:       number of requests
 * @seq0:        nlmsg_seq of request 0; request i gets seq0 + i (mod 2^32)
 * @chunk:       requests per sendmsg(); at most what the receive buffer holds
 * @mins, @maxs: ALLOCSPI only, both NULL or both @count entries: SPI range of
 *               each request, host order
 * @sendbuf:     at least @chunk * align4(message size) bytes
 * @recvbuf:     at least SPIALLOC_RECV_SLOT bytes
 * @spis:        out, @count entries (ALLOCSPI; NULL for DELSA): SPI, host order
 * @errs:        out, @count entries: 0, errno, SPIALLOC_PENDING or SPIALLOC_LOST
 * @errmsg:      out, optional: ext-ack text of the first error that had one
 * @sent:        requests sent so far
 * @received:    requests answered so far
 * @overruns:    times the socket reported ENOBUFS (replies were dropped)
 * @strays:      messages that matched no pending request (ignored)
 * @malformed:   truncated or inconsistent messages (ignored)
 * @pending:     requests sent and still unanswered
 * @settled:     every request below this index has its final errs[] value
 * @stop:        set by spialloc_batch_drain(): send nothing more
 */
struct spialloc_batch {
	int fd;
	uint32_t portid;
	const uint8_t *tmpl;
	uint32_t tmpl_len;
	uint32_t stride;
	uint32_t count, seq0, chunk;
	const uint32_t *mins, *maxs;
	uint8_t *sendbuf;
	uint32_t sendbuf_len;
	uint8_t *recvbuf;
	uint32_t recvbuf_len;
	uint32_t *spis;
	int32_t *errs;
	char *errmsg;
	uint32_t errmsg_len;
	uint32_t sent, received, overruns, strays, malformed;
	uint32_t pending, settled;
	int stop;
};

/* the longest ALLOCSPI message spialloc_alloc_one() takes (attributes included) */
#define SPIALLOC_ONE_MAX	512
/* spialloc_alloc_one(): send() failed, errno says why (nothing was sent) */
#define SPIALLOC_ONE_FAILED	(-1)
/* spialloc_alloc_one(): sent, but what came back is for Python (see @got) */
#define SPIALLOC_ONE_OTHER	(-2)
/* spialloc_alloc_req(): another call is using the socket; nothing was sent */
#define SPIALLOC_ONE_BUSY	(-3)

/**
 * struct spialloc_one - a socket's state for spialloc_alloc_one() and
 * spialloc_alloc_req()
 * @fd:      spialloc_alloc_req()'s socket (-1 once spialloc_one_close() ran);
 *           spialloc_alloc_one() takes its own per call
 * @portid:  the socket's netlink port id
 * @rbuf:    receive buffer of @rlen bytes (Python's, read on its slow path)
 * @got:     out: bytes of the datagram read into @rbuf, -errno if recv()
 *           failed
 * @busy:    0, or the calling thread's token while spialloc_alloc_req() uses
 *           the socket (and after SPIALLOC_ONE_OTHER, until
 *           spialloc_one_release())
 * @scratch: where the message is built
 */
struct spialloc_one {
	int fd;
	uint32_t portid;
	uint8_t *rbuf;
	uint32_t rlen;
	int64_t got;
	uintptr_t busy;
	uint8_t scratch[SPIALLOC_ONE_MAX];
};

/**
 * struct spialloc_req - one request, prepared once for spialloc_alloc_req()
 * @len:     bytes of @msg, at most SPIALLOC_ONE_MAX
 * @lo, @hi: SPI range to patch in, host order
 * @msg:     the ALLOCSPI message (its nlmsg_seq is patched per call)
 */
struct spialloc_req {
	uint32_t len, lo, hi;
	uint8_t msg[SPIALLOC_ONE_MAX];
};

int64_t spialloc_alloc_one(struct spialloc_one *o, int fd, const char *tmpl,
			   uint32_t len, uint32_t seq, uint32_t lo, uint32_t hi);
int64_t spialloc_alloc_req(struct spialloc_one *o, const struct spialloc_req *r,
			   uint32_t seq);
int64_t spialloc_one_last(const struct spialloc_one *o, uint32_t seq);
int spialloc_one_held(const struct spialloc_one *o);
void spialloc_one_release(struct spialloc_one *o);
void spialloc_one_close(struct spialloc_one *o);

int spialloc_batch_init_allocspi(struct spialloc_batch *b);
int spialloc_batch_init_delsa(struct spialloc_batch *b);
int spialloc_batch_step(struct spialloc_batch *b);
int spialloc_batch_drain(struct spialloc_batch *b);
uint32_t spialloc_batch_feed(struct spialloc_batch *b, const uint8_t *buf,
			     uint32_t len, uint32_t src_pid, int truncated);

/*
 * Layouts as this compiler sees them, exported so the Python test suite can
 * compare them with spialloc/_wire.py, which packs the same bytes by hand.
 */
#define SPIALLOC_SA_OFF(f)	((int)offsetof(struct xfrm_usersa_info, f))
static const int SPIALLOC_SIZEOF_NLMSGHDR = sizeof(struct nlmsghdr);
static const int SPIALLOC_SIZEOF_NLMSGERR = sizeof(struct nlmsgerr);
static const int SPIALLOC_SIZEOF_NLATTR = sizeof(struct nlattr);
static const int SPIALLOC_SIZEOF_SELECTOR = sizeof(struct xfrm_selector);
static const int SPIALLOC_SIZEOF_XFRM_ID = sizeof(struct xfrm_id);
static const int SPIALLOC_SIZEOF_LIFETIME_CFG = sizeof(struct xfrm_lifetime_cfg);
static const int SPIALLOC_SIZEOF_LIFETIME_CUR = sizeof(struct xfrm_lifetime_cur);
static const int SPIALLOC_SIZEOF_STATS = sizeof(struct xfrm_stats);
static const int SPIALLOC_SIZEOF_USERSA_INFO = sizeof(struct xfrm_usersa_info);
static const int SPIALLOC_SIZEOF_USERSPI_INFO = sizeof(struct xfrm_userspi_info);
static const int SPIALLOC_SIZEOF_USERSA_ID = sizeof(struct xfrm_usersa_id);
static const int SPIALLOC_SIZEOF_MARK = sizeof(struct xfrm_mark);
static const int SPIALLOC_SIZEOF_USER_ACQUIRE = sizeof(struct xfrm_user_acquire);
static const int SPIALLOC_SIZEOF_USER_EXPIRE = sizeof(struct xfrm_user_expire);
static const int SPIALLOC_SIZEOF_USERPOLICY_INFO = sizeof(struct xfrm_userpolicy_info);
static const int SPIALLOC_SIZEOF_USER_TMPL = sizeof(struct xfrm_user_tmpl);
static const int SPIALLOC_OFFSETOF_SEL = SPIALLOC_SA_OFF(sel);
static const int SPIALLOC_OFFSETOF_ID_DADDR = SPIALLOC_SA_OFF(id.daddr);
static const int SPIALLOC_OFFSETOF_ID_SPI = SPIALLOC_SA_OFF(id.spi);
static const int SPIALLOC_OFFSETOF_ID_PROTO = SPIALLOC_SA_OFF(id.proto);
static const int SPIALLOC_OFFSETOF_SADDR = SPIALLOC_SA_OFF(saddr);
static const int SPIALLOC_OFFSETOF_CURLFT = SPIALLOC_SA_OFF(curlft);
static const int SPIALLOC_OFFSETOF_SA_SEQ = SPIALLOC_SA_OFF(seq);
static const int SPIALLOC_OFFSETOF_REQID = SPIALLOC_SA_OFF(reqid);
static const int SPIALLOC_OFFSETOF_SA_FAMILY = SPIALLOC_SA_OFF(family);
static const int SPIALLOC_OFFSETOF_MODE = SPIALLOC_SA_OFF(mode);
static const int SPIALLOC_OFFSETOF_REPLAY_WINDOW = SPIALLOC_SA_OFF(replay_window);
static const int SPIALLOC_OFFSETOF_SA_FLAGS = SPIALLOC_SA_OFF(flags);
static const int SPIALLOC_OFFSETOF_SPI_MIN = offsetof(struct xfrm_userspi_info, min);
static const int SPIALLOC_OFFSETOF_SPI_MAX = offsetof(struct xfrm_userspi_info, max);
static const int SPIALLOC_OFFSETOF_EXPIRE_HARD = offsetof(struct xfrm_user_expire, hard);
static const int SPIALLOC_OFFSETOF_ACQUIRE_ID = offsetof(struct xfrm_user_acquire, id);
static const int SPIALLOC_OFFSETOF_ACQUIRE_SADDR = offsetof(struct xfrm_user_acquire, saddr);
static const int SPIALLOC_OFFSETOF_ACQUIRE_SEL = offsetof(struct xfrm_user_acquire, sel);
static const int SPIALLOC_OFFSETOF_ACQUIRE_POLICY = offsetof(struct xfrm_user_acquire, policy);
static const int SPIALLOC_OFFSETOF_ACQUIRE_SEQ = offsetof(struct xfrm_user_acquire, seq);
static const int SPIALLOC_OFFSETOF_TMPL_REQID = offsetof(struct xfrm_user_tmpl, reqid);
static const int SPIALLOC_OFFSETOF_TMPL_MODE = offsetof(struct xfrm_user_tmpl, mode);
static const int SPIALLOC_OFFSETOF_SA_LFT = SPIALLOC_SA_OFF(lft);
static const int SPIALLOC_OFFSETOF_ACQUIRE_ALGOS = offsetof(struct xfrm_user_acquire, aalgos);
static const int SPIALLOC_OFFSETOF_POLICY_LFT = offsetof(struct xfrm_userpolicy_info, lft);
static const int SPIALLOC_OFFSETOF_POLICY_PRIORITY = offsetof(struct xfrm_userpolicy_info, priority);
static const int SPIALLOC_OFFSETOF_POLICY_INDEX = offsetof(struct xfrm_userpolicy_info, index);
static const int SPIALLOC_OFFSETOF_POLICY_DIR = offsetof(struct xfrm_userpolicy_info, dir);
static const int SPIALLOC_OFFSETOF_TMPL_FAMILY = offsetof(struct xfrm_user_tmpl, family);
static const int SPIALLOC_OFFSETOF_TMPL_SADDR = offsetof(struct xfrm_user_tmpl, saddr);
static const int SPIALLOC_OFFSETOF_TMPL_AALGOS = offsetof(struct xfrm_user_tmpl, aalgos);
static const int SPIALLOC_OFFSETOF_USERSA_ID_FAMILY = offsetof(struct xfrm_usersa_id, family);
static const int SPIALLOC_OFFSETOF_USERSA_ID_PROTO = offsetof(struct xfrm_usersa_id, proto);

#endif /* SPIALLOC_H */
