"""cffi builder (API mode, out-of-line) for ``spialloc._native``.

Used by setuptools through ``setup(cffi_modules=["spialloc/_ffi_build.py:ffibuilder"])``,
which runs from the project root, so source paths are relative to it.  For an
in-place development build run ``python3 spialloc/_ffi_build.py``: it compiles in
``build/`` and copies the extension next to this file.

Every constant and layout below is declared with ``...`` so the C compiler, not
this file, supplies the value; ``tests/unit/test_native.py`` compares them with
``spialloc/_wire.py``.
"""

from __future__ import annotations

import os

from cffi import FFI

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SOURCES = ["csrc/spialloc.c"]
_HEADERS = ["csrc/spialloc.h"]

_CONSTANTS = """
#define NETLINK_XFRM ...
#define SOL_NETLINK ...
#define NETLINK_EXT_ACK ...
#define NETLINK_CAP_ACK ...
#define NLMSG_ERROR ...
#define NLM_F_REQUEST ...
#define NLM_F_ACK ...
#define NLM_F_CAPPED ...
#define NLM_F_ACK_TLVS ...
#define NLMSGERR_ATTR_MSG ...
#define XFRM_MSG_NEWSA ...
#define XFRM_MSG_DELSA ...
#define XFRM_MSG_GETSA ...
#define XFRM_MSG_ALLOCSPI ...
#define XFRM_MSG_ACQUIRE ...
#define XFRM_MSG_EXPIRE ...
#define XFRM_MSG_UPDSA ...
#define XFRMA_REPLAY_VAL ...
#define XFRMA_MARK ...
#define XFRMA_IF_ID ...
#define XFRMA_SA_DIR ...
#define XFRMA_SA_PCPU ...
#define SPIALLOC_PENDING ...
#define SPIALLOC_LOST ...
#define SPIALLOC_RECV_SLOT ...
#define SPIALLOC_RECV_BATCH ...
#define SPIALLOC_ONE_MAX ...
"""

_LAYOUT_NAMES = """
NLMSGHDR NLMSGERR NLATTR SELECTOR XFRM_ID LIFETIME_CFG LIFETIME_CUR STATS USERSA_INFO
USERSPI_INFO USERSA_ID MARK USER_ACQUIRE USER_EXPIRE USERPOLICY_INFO USER_TMPL
""".split()
_OFFSET_NAMES = """
SEL ID_DADDR ID_SPI ID_PROTO SADDR CURLFT SA_SEQ REQID SA_FAMILY MODE REPLAY_WINDOW SA_FLAGS
SPI_MIN SPI_MAX EXPIRE_HARD ACQUIRE_ID ACQUIRE_SADDR ACQUIRE_SEL ACQUIRE_POLICY ACQUIRE_SEQ
TMPL_REQID TMPL_MODE USERSA_ID_FAMILY USERSA_ID_PROTO
SA_LFT ACQUIRE_ALGOS POLICY_LFT POLICY_PRIORITY POLICY_INDEX POLICY_DIR TMPL_FAMILY TMPL_SADDR TMPL_AALGOS
""".split()

_CDEF = (
    _CONSTANTS
    + "".join(f"static const int SPIALLOC_SIZEOF_{n};\n" for n in _LAYOUT_NAMES)
    + "".join(f"static const int SPIALLOC_OFFSETOF_{n};\n" for n in _OFFSET_NAMES)
    + """
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
    ...;
};

struct spialloc_one {
    int fd;
    uint32_t portid;
    uint8_t *rbuf;
    uint32_t rlen;
    int64_t got;
    ...;
};

struct spialloc_req {
    uint32_t len, lo, hi;
    uint8_t msg[...];
};

#define SPIALLOC_ONE_FAILED ...
#define SPIALLOC_ONE_OTHER ...
#define SPIALLOC_ONE_BUSY ...
int64_t spialloc_alloc_one(struct spialloc_one *o, int fd, const char *tmpl,
                           uint32_t len, uint32_t seq, uint32_t lo, uint32_t hi);
int64_t spialloc_alloc_req(struct spialloc_one *o, const struct spialloc_req *r, uint32_t seq);
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
"""
)


def make_builder(root: str = "") -> FFI:
    """The builder, with source paths relative to the project root or under ``root``.

    setuptools wants them relative (it runs from the root); ``FFI.compile`` changes
    into its tmpdir first, so the in-place build passes the absolute root.
    """
    builder = FFI()
    builder.cdef(_CDEF)
    builder.set_source(
        "spialloc._native",
        '#include "spialloc.h"\n',
        sources=[os.path.join(root, s) for s in _SOURCES],
        include_dirs=[os.path.join(root, "csrc")],
        depends=[os.path.join(root, h) for h in _HEADERS],
        extra_compile_args=["-O2", "-Wall", "-Wextra"],
    )
    return builder


ffibuilder = make_builder()


def _build_in_place() -> str:
    """Compile in build/ and copy the extension into spialloc/; return its path."""
    import glob
    import shutil

    built = make_builder(_ROOT).compile(tmpdir=os.path.join(_ROOT, "build"), verbose=True)
    target = os.path.join(_ROOT, "spialloc", os.path.basename(built))
    if os.path.abspath(built) != target:
        for stale in glob.glob(os.path.join(_ROOT, "spialloc", "_native.*.so")):
            os.unlink(stale)
        shutil.copy2(built, target)
    return target


if __name__ == "__main__":
    print(_build_in_place())
