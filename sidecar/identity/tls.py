"""SSLContexts for mutual TLS between sidecars, built from an in-memory ``Svid``.

Theory of operation
-------------------
Both directions use the same settings (docs/identity.md explains each):

* TLS 1.2 and 1.3 only; for 1.2 only ECDHE key exchange with AES-GCM or ChaCha20-Poly1305
  (every 1.3 suite is already AEAD). No compression (CRIME), no renegotiation.
* Certificates are required both ways and verified against the trust bundles only (never
  the system store): the context holds the roots of every trust domain the sidecar trusts,
  and the caller applies the trust-domain rule (``sidecar.identity.trust``) after the
  handshake, once per connection. Hostnames are not checked: a workload's identity is its SPIFFE ID, which the
  data path reads with ``peer_identity_from_der`` right after the handshake and compares
  with what it expects. That call also applies the SVID leaf rules OpenSSL does not know.
* No session resumption on the server: no session tickets (``OP_NO_TICKET`` and
  ``num_tickets = 0``), so TLS 1.3 never resumes, and OpenSSL's server session-ID cache off
  (``no_session_cache``), so TLS 1.2 does not either. A resumed session skips chain
  verification, and the cache kept every TLS 1.2 session, the whole chain its client sent
  included (up to 20,480 sessions for two hours), so a peer with any trusted certificate
  could grow a sidecar by about 0.2-0.3 MB a handshake with junk certificates in its chain,
  refused or not (a hostile review measured 45 -> 203 MB in 750 handshakes). CPython has no
  switch for that cache: ``no_session_cache`` calls OpenSSL's ``SSL_CTX_ctrl`` on the
  context through ``ctypes``, after checking that the ``SSL_CTX`` it found is the
  context's own; where that cannot be done the server context accepts TLS 1.3 only. Were
  a TLS 1.2 session resumed anyway, it reports no verified chain, and the trust-domain check
  (``TrustStore.check_peer``) verifies the chain the peer sent against the current bundle
  and clock.

The ``ssl`` module loads a certificate chain only from a path. The chain and key are in
memory (``load_svid`` read them from one snapshot; re-reading the files could mix
generations), so we hand them over through an anonymous ``memfd`` (Linux): the key never
touches a filesystem. Elsewhere we fall back to a 0600 file in a fresh 0700 temporary
directory, removed as soon as OpenSSL has read it.
"""

from __future__ import annotations

import _ssl
import contextlib
import functools
import os
import shutil
import ssl
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

from sidecar.identity.svid import MAX_CHAIN_DEPTH, Svid
from sidecar.identity.trust import MAX_PEER_CHAIN_BYTES

# @SECLEVEL=2 whatever the system's OpenSSL configuration says: keys of at least 112 bits of
# security (RSA >= 2048, no P-192) and no SHA-1 in the peer's chain or handshake signatures.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!SHA1:@SECLEVEL=2"
DEFAULT_ALPN: tuple[str, ...] = ("http/1.1",)


@contextlib.contextmanager
def memory_files(*blobs: bytes) -> Iterator[list[str]]:
    """Paths OpenSSL can open that hold ``blobs``, valid inside the ``with`` block only."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fds: list[int] = []
        try:
            for blob in blobs:
                fd = os.memfd_create("sidecar-tls", os.MFD_CLOEXEC)
                fds.append(fd)
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view) :]
            yield [f"/proc/self/fd/{fd}" for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)
        return
    directory = tempfile.mkdtemp(prefix="sidecar-svid-")  # mode 0700
    try:
        paths = []
        for i, blob in enumerate(blobs):
            path = os.path.join(directory, f"{i}.pem")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, blob)
            finally:
                os.close(fd)
            paths.append(path)
        yield paths
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def load_svid_into(ctx: ssl.SSLContext, svid: Svid, roots_pem: bytes | None = None) -> None:
    """Install ``svid``'s chain and key in ``ctx``, and ``roots_pem`` (default: the SVID's
    own bundle) as the only trust. ``b""`` is no root at all: every peer fails its
    handshake. (It was read as "the default", so after every root of the own bundle was
    withdrawn the contexts trusted the withdrawn roots again, and peers under them passed
    the handshake, refused only after it; found by a hostile review.)"""
    with memory_files(svid.chain_pem, svid.key_pem) as (chain_path, key_path):
        ctx.load_cert_chain(chain_path, key_path)
    roots = svid.bundle_pem if roots_pem is None else roots_pem
    if roots:
        ctx.load_verify_locations(cadata=roots.decode("ascii"))


def _harden(ctx: ssl.SSLContext, alpn: Sequence[str]) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.verify_mode = ssl.CERT_REQUIRED
    bound_peer_chain(ctx)
    limit_key_exchange(ctx)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))


# The key exchanges a context offers or accepts (TLS 1.3 groups; TLS 1.2's ECDHE curves), the
# first list OpenSSL takes: X25519 (and its hybrid with ML-KEM where OpenSSL has it), P-256,
# P-384 -- what Envoy, Go and BoringSSL offer. OpenSSL 3.0's defaults also hold the
# finite-field groups ffdhe2048 to ffdhe8192: a ClientHello offering only ffdhe8192, sent by
# anyone before any certificate, made the sidecar compute an 8192-bit Diffie-Hellman on its
# event loop, 174 ms a hello against 0.8 ms with X25519, and an upstream's address could ask
# the same of an outbound dial (found by a hostile review, thirty-fifth session).
KEY_EXCHANGE_GROUPS = ("X25519MLKEM768:X25519:P-256:P-384", "X25519:P-256:P-384")
# OpenSSL's SSL_CTX_ctrl commands and session cache modes (ssl.h).
_SSL_CTRL_SET_GROUPS_LIST = 92
_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_CTRL_GET_SESS_CACHE_MODE = 45
_SSL_CTRL_SET_MAX_CERT_LIST = 51
_SSL_CTRL_GET_MAX_CERT_LIST = 50
_SSL_SESS_CACHE_OFF = 0
# What OpenSSL itself verifies of a chain a peer sends, during the handshake: at most
# ``MAX_CHAIN_DEPTH`` intermediates (its default is 100), and a Certificate message of at
# most ``MAX_PEER_CHAIN_BYTES`` of DER and the message's own framing (its default is 100 KB).
# The handshake verifies every signature of the chain on the event loop, before the trust
# rules that refuse long chains and weak keys run: a peer holding a CA key under a partner's
# root sent 60 RSA-3072 intermediates with 3,070-bit public exponents (a legal RSA key for
# OpenSSL) and held the loop 0.35 s a handshake (found by a hostile review, thirty-fourth
# session). A longer chain now fails while it is built, before any signature is checked.
_CERT_LIST_FRAMING = 8 * 1024


@functools.cache
def _libssl() -> Any:
    """The libssl the ``ssl`` module runs on (``_ssl`` links it, or holds it statically),
    with the functions this module and ``sidecar.net.transport`` call; None when it cannot
    be had."""
    try:
        import ctypes

        lib = ctypes.CDLL(_ssl.__file__)
        lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long,
                                     ctypes.c_void_p]
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.SSL_CTX_set_verify_depth.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.SSL_CTX_set_verify_depth.restype = None
        lib.SSL_CTX_get_verify_depth.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_get_verify_depth.restype = ctypes.c_int
        # (``sidecar.net.transport._shutdown_once``: a close_notify that reads nothing)
        for name, args, result in (
                ("SSL_shutdown", [ctypes.c_void_p], ctypes.c_int),
                ("SSL_get_error", [ctypes.c_void_p, ctypes.c_int], ctypes.c_int),
                ("SSL_get_SSL_CTX", [ctypes.c_void_p], ctypes.c_void_p),
                ("ERR_clear_error", [], None)):
            function = getattr(lib, name)
            function.argtypes = args
            function.restype = result
        return lib
    except (ImportError, OSError, AttributeError):
        return None


def _ctx_pointer(ctx: ssl.SSLContext) -> int | None:
    """The ``SSL_CTX *`` of ``ctx``, or None where it cannot be had.

    CPython's ``SSLContext`` object starts with the ``SSL_CTX`` pointer right after the
    object header (``PySSLContext`` in Modules/_ssl.c, unchanged since Python 3.0). The
    pointer is used only when ``SSL_CTX_get_options`` through it reads exactly the options
    ``ctx.options`` reports."""
    lib = _libssl()
    if lib is None:
        return None
    import ctypes

    pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not pointer or lib.SSL_CTX_get_options(pointer) != int(ctx.options):
        return None
    return int(pointer)


def bound_peer_chain(ctx: ssl.SSLContext) -> bool:
    """Bound what OpenSSL verifies of a peer's chain in the handshake (see
    ``_CERT_LIST_FRAMING``); False when it cannot be (the trust rules after the handshake
    still refuse such chains, after OpenSSL's work). Both are read back after they are set."""
    pointer = _ctx_pointer(ctx)
    if pointer is None:
        return False
    lib = _libssl()
    limit = MAX_PEER_CHAIN_BYTES + _CERT_LIST_FRAMING
    lib.SSL_CTX_set_verify_depth(pointer, MAX_CHAIN_DEPTH)
    lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_MAX_CERT_LIST, limit, None)
    return bool(lib.SSL_CTX_get_verify_depth(pointer) == MAX_CHAIN_DEPTH
                and lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_GET_MAX_CERT_LIST, 0, None) == limit)


def strict_eof(ctx: ssl.SSLContext) -> None:
    """A peer's TCP close without TLS's close_notify is reported as the truncation it may be,
    never as a clean end: ``OP_IGNORE_UNEXPECTED_EOF`` off. CPython 3.10 and the 3.11
    releases before the fix of gh-95494 (Debian 12's system 3.11.2 among them) set it on
    every new context with OpenSSL 3, so a close-delimited body cut by anyone on the path
    read as complete and a ragged stream end as a clean one (found when the suite first ran
    on Debian's 3.11.2, thirty-seventh session). With it off those releases raise
    ``ssl.SSLError`` with reason ``UNEXPECTED_EOF_WHILE_READING`` where later ones raise
    ``ssl.SSLEOFError`` (``sidecar.net.transport.eof_without_close_notify`` reads both).
    Every context the sidecar makes passes here (``limit_key_exchange`` calls it)."""
    ctx.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)


def limit_key_exchange(ctx: ssl.SSLContext) -> str:
    """Offer and accept only the groups of ``KEY_EXCHANGE_GROUPS`` (the first list OpenSSL
    takes), and no TLS 1.2 suite with a finite-field key exchange (DHE: the server sends its
    own group, which OpenSSL's client does not check for size or primality -- an odd random
    10,000-bit modulus cost a client 1.1 s a handshake; the stdlib's default suites offer
    DHE; found by the review of the groups fix); the groups set, or, where the ``SSL_CTX``
    cannot be had, P-256 alone (the stdlib's ``set_ecdh_curve``, which on OpenSSL 3 sets the
    one group). Also ``strict_eof``: every context goes through here."""
    strict_eof(ctx)
    suites = ctx.get_ciphers()
    if any(suite["kea"] == "kx-dhe" for suite in suites):
        ctx.set_ciphers(f"@SECLEVEL={ctx.security_level}:" + ":".join(
            suite["name"] for suite in suites
            if suite["kea"] != "kx-dhe" and suite["protocol"] != "TLSv1.3"))
    pointer = _ctx_pointer(ctx)
    if pointer is not None:
        lib = _libssl()
        for groups in KEY_EXCHANGE_GROUPS:
            if lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode()) == 1:
                return groups
            lib.ERR_clear_error()  # (a group this OpenSSL does not know: the next list)
    ctx.set_ecdh_curve("prime256v1")
    return "P-256"


def no_session_cache(ctx: ssl.SSLContext) -> bool:
    """Turn OpenSSL's server session-ID cache off for ``ctx``; False when it cannot be (the
    pointer: ``_ctx_pointer``; the mode is read back after it is set)."""
    pointer = _ctx_pointer(ctx)
    if pointer is None:
        return False
    lib = _libssl()
    lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_SESS_CACHE_OFF, None)
    return bool(lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_GET_SESS_CACHE_MODE, 0, None)
                == _SSL_SESS_CACHE_OFF)


def server_only_fresh_sessions(ctx: ssl.SSLContext) -> None:
    """No session resumption on a server context: no tickets, no session-ID cache (or, where
    the cache cannot be turned off, TLS 1.3 only, which without tickets never resumes)."""
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    if not no_session_cache(ctx):
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3


def server_context(svid: Svid, *, alpn: Sequence[str] = DEFAULT_ALPN,
                   roots_pem: bytes | None = None) -> ssl.SSLContext:
    """The inbound context: requires and verifies a client certificate from the bundle.

    After the handshake the caller must run ``peer_identity_from_der`` on the peer's leaf
    and refuse the connection when it raises. ``alpn=()`` for opaque TCP listeners.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx, alpn)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    server_only_fresh_sessions(ctx)
    load_svid_into(ctx, svid, roots_pem)
    return ctx


def client_context(svid: Svid, *, alpn: Sequence[str] = DEFAULT_ALPN,
                   roots_pem: bytes | None = None) -> ssl.SSLContext:
    """The outbound context: presents our SVID and verifies the server against the bundle.

    ``check_hostname`` is off on purpose: the caller checks the server's SPIFFE ID with
    ``peer_identity_from_der`` after the handshake and refuses any other identity.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    _harden(ctx, alpn)
    load_svid_into(ctx, svid, roots_pem)
    return ctx
