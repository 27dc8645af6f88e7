"""``sidecar check``: pre-flight checks of a sidecar config, and live checks of a running one.

Theory of operation
-------------------
Every check is one entry of a family, run in order, producing one ``CheckResult``: a group
(``config``, ``identity``, ``policy``, ``jwks``, ``ports``, ``audit``, ``live``), a title,
a status and, on a problem, a hint saying what to do. Status is one of

* ``ok``   -- the check passed;
* ``warn`` -- it passed but something will bite soon (a certificate near its end, lint
  findings); warnings never change the exit code;
* ``fail`` -- the sidecar would not start or would not work; exit code 1;
* ``skip`` -- the check could not run (an earlier one failed, ``--offline``, an endpoint the
  running sidecar does not serve); never a failure.

A failed prerequisite skips what depends on it (no SVID checks without a readable
certificate) instead of piling up consequences of one mistake. The checks only read:
ports are bound and released at once, the audit directory gets a probe file that is removed.

``static_checks`` needs a config file; ``live_checks`` asks a running sidecar's admin port
(``--admin URL``) for readiness, certificate expiry, policy version and last reload error,
and the audit head: the newest signed checkpoint, whose signature ``--pubkey`` verifies;
``/config`` tells whether one is expected (audit signing on) so that its absence is a
warning, not a skip. Audit key files are read as the sidecar reads them (Ed25519 signing key,
AES data key), so a key the sidecar would refuse at start fails here; so are the identity
files (``load_svid``'s reads and ``check_signers``, ``TrustStore.build``, ``no_shadowing``, and
last ``TlsState.load`` itself: a set ``sidecar run`` refuses fails with its rule). ``sidecar run
--check`` runs the offline file checks (no ports, no network), so a config whose certificate
files are missing is refused there too.

The checks and their JSON are documented in docs/operations.md ("sidecar check").
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import math
import os
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, TextIO
from urllib.parse import urlsplit

import trio

from sidecar.config.source import read_regular
from sidecar.ctlhttp.client import ClientError, Target, parse_url, request, shown_url
from sidecar.jsondoc import read_json
from sidecar.output import Lines, add_output_flag, emit, paint, safe, safe_lines, use_colour

Status = Literal["ok", "warn", "fail", "skip"]
MARKS: dict[str, str] = {"ok": "[ok]  ", "warn": "[warn]", "fail": "[FAIL]", "skip": "[skip]"}
# A certificate is "close to expiry" when less than this share of its lifetime is left:
# cert-manager renews at 2/3 of the lifetime and SPIRE at 1/2, so below 1/3 rotation failed.
EXPIRY_SHARE = 1 / 3
DEFAULT_MIN_VALIDITY = 3600.0
HTTP_TIMEOUT = 5.0
DEFAULT_ADMIN_PORT = 15000
MAX_ANSWER_BYTES = 1024 * 1024
MAX_METRICS_BYTES = 16 * 1024 * 1024  # /metrics of a busy sidecar (many label sets)
MAX_ERROR_CHARS = 300  # of a failed admin read's message, in a check's detail
MAX_DETAIL_LINES = 5
MAX_SHOWN_SECONDS = 100 * 365 * 86400.0  # a certificate's time left, shown at most


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One check's outcome: a line of the table, an entry of ``checks`` in ``-o json``."""

    group: str
    title: str
    status: Status
    detail: str = ""
    hint: str = ""


class _Run:
    """Collects results; ``add`` returns whether the check passed (ok or warn)."""

    def __init__(self) -> None:
        self.results: list[CheckResult] = []

    def add(self, group: str, title: str, status: Status, detail: str = "",
            hint: str = "") -> bool:
        self.results.append(CheckResult(group, title, status, detail, hint if status in (
            "fail", "warn") else ""))
        return status in ("ok", "warn")

    def skip(self, group: str, title: str, why: str) -> None:
        self.add(group, title, "skip", why)


def _duration(seconds: float) -> str:
    return str(dt.timedelta(seconds=int(seconds)))


def _problems(exc: Any) -> str:
    lines = [str(p) for p in getattr(exc, "problems", [])] or [str(exc)]
    more = len(lines) - MAX_DETAIL_LINES
    shown = lines[:MAX_DETAIL_LINES] + ([f"... and {more} more"] if more > 0 else [])
    return Lines("\n".join(safe(line) for line in shown))


# --- identity ---------------------------------------------------------------------------------


def _check_identity(run: _Run, cfg: Any, now: float, min_validity: float) -> str | None:
    """The SVID checks; returns our SPIFFE ID when the certificate is a valid SVID."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from sidecar.identity.svid import (
        SvidError,
        _public_der,
        _read,
        check_signers,
        load_roots,
        validate_svid_leaf,
        verify_chain,
    )

    g = "identity"
    ident = cfg.identity
    loaded: dict[str, Any] = {}
    loaders: list[tuple[str, str, str, Callable[[bytes], Any]]] = [
        ("cert", "certificate", ident.cert, x509.load_pem_x509_certificates),
        ("key", "private key", ident.key,
         lambda b: serialization.load_pem_private_key(b, password=None)),
        # PEM or a SPIFFE trust bundle (JSON), read as ``sidecar run`` reads it: the
        # pre-flight refused a JSON bundle that ``run`` starts with (a hostile review).
        ("bundle", "trust bundle", ident.bundle, lambda b: load_roots(b, ident.bundle)),
    ]
    for key, what, path, parse in loaders:
        title = f"{what} file exists and parses"
        try:
            # As ``load_svid`` reads it (``_read``): a regular file of at most
            # MAX_FILE_BYTES. The pre-flight read one byte more and parsed what it got, so
            # a certificate padded past 1 MiB passed and ``run`` refused it (a hostile
            # review, session 34).
            data = _read(path, path)
        except SvidError as exc:
            run.add(g, title, "fail", f"{path}: {exc.message} [rule {exc.rule}]",
                    f"identity.{key} in {cfg.source} must name a readable PEM file of at "
                    "most 1 MiB (sidecar cert issue writes tls.crt, tls.key, ca.crt)")
            continue
        try:
            loaded[key] = parse(data)
        except Exception as exc:  # noqa: BLE001 -- ValueError, TypeError, UnsupportedAlgorithm
            kind = "trust bundle" if key == "bundle" else f"PEM {what}"
            run.add(g, title, "fail", f"{path}: not a {kind}: {exc}",
                    f"identity.{key} must be a PEM file (an encrypted key is not supported)"
                    + (", or a SPIFFE trust bundle (JSON)" if key == "bundle" else ""))
            continue
        run.add(g, title, "ok", path)
    titles = ("certificate is a valid X.509-SVID", "private key matches the certificate",
              "trust bundle verifies the certificate", "certificate is valid and not near expiry")
    if "cert" not in loaded:
        for t in titles:
            run.skip(g, t, "certificate not readable")
        _check_loads_as_run(run, cfg)
        return None
    chain = loaded["cert"]
    leaf = chain[0]
    spiffe_id: str | None = None
    try:
        spiffe_id = str(validate_svid_leaf(leaf))
        run.add(g, titles[0], "ok", spiffe_id)
    except SvidError as exc:
        run.add(g, titles[0], "fail", f"{exc.message} [rule {exc.rule}]",
                "issue a workload certificate with one spiffe:// URI SAN, not a CA "
                "(docs/identity.md lists the rules)")
    try:
        matches = "key" in loaded and \
            _public_der(loaded["key"].public_key()) == _public_der(leaf.public_key())
    except Exception:  # noqa: BLE001 -- a key type that cannot be compared: no match
        matches = False
    if "key" in loaded:
        if matches:
            run.add(g, titles[1], "ok")
        else:
            run.add(g, titles[1], "fail", f"{ident.key} is not the key of {ident.cert}",
                    "write the certificate and its key together (a rotation updated only one)")
    else:
        run.skip(g, titles[1], "private key not readable")
    not_before = leaf.not_valid_before_utc.timestamp()
    not_after = leaf.not_valid_after_utc.timestamp()
    chain_ends = not_after
    if not not_before <= now <= not_after:
        # Path validation needs a time at which the leaf is valid; an expired leaf is the
        # expiry check's finding, not a second "untrusted" one.
        run.skip(g, titles[2], "certificate outside its validity period")
    elif "bundle" in loaded:
        try:
            built = verify_chain(leaf, chain[1:], loaded["bundle"], now)
            # The chain's intermediates judged as ``load_svid`` judges them (the same call):
            # the pre-flight verified the chain only, and passed an own intermediate that
            # names a partner's trust domain, carries a workload ID or lacks an EKU that
            # ``sidecar run`` refuses (a hostile review, session 34).
            if spiffe_id is not None:
                check_signers(spiffe_id, [c.public_bytes(serialization.Encoding.DER)
                                          for c in built[1:-1]])
            run.add(g, titles[2], "ok", f"{len(loaded['bundle'])} root(s)")
            # The chain is valid only as long as its first certificate to expire (an
            # intermediate or the root may expire before the leaf): Svid.trust_ends.
            chain_ends = min(c.not_valid_after_utc.timestamp() for c in built)
        except SvidError as exc:
            run.add(g, titles[2], "fail", f"{exc.message} [rule {exc.rule}]",
                    _chain_hint(exc.rule, ident.bundle, spiffe_id))
    else:
        run.skip(g, titles[2], "trust bundle not readable")
    lifetime = max(not_after - not_before, 1.0)
    left = min(not_after, chain_ends) - now
    if now < not_before:
        run.add(g, titles[3], "fail", f"valid only from {leaf.not_valid_before_utc}",
                "check the clock of this machine and of the CA")
    elif left <= 0:
        run.add(g, titles[3], "fail", f"expired at {leaf.not_valid_after_utc}",
                "issue a new certificate; check that rotation (cert-manager, SPIRE) runs")
    elif left < max(lifetime * EXPIRY_SHARE, min_validity):
        first = "" if chain_ends >= not_after else " (an intermediate or the root expires first)"
        run.add(g, titles[3], "warn", f"{_duration(left)} left of {_duration(lifetime)}{first}",
                "rotation should have renewed it by now: check cert-manager / SPIRE")
    else:
        run.add(g, titles[3], "ok", f"{_duration(left)} left")
    _check_trust_domains(run, cfg, spiffe_id, loaded.get("bundle"))
    _check_loads_as_run(run, cfg)
    return spiffe_id


# Rules of the signing-certificate checks (``check_signers``) an own intermediate may break.
_SIGNER_RULES = frozenset({"signing-cert-invalid", "key-weak", "signature-weak",
                           "serial-invalid", "extensions-invalid"})


def _chain_hint(rule: str, bundle: str, spiffe_id: str | None) -> str:
    """What to do when the certificate's chain fails ``verify_chain`` / ``check_signers``."""
    if rule == "signer-trust-domain":
        from sidecar.identity.trust import trust_domain_of

        td = trust_domain_of(spiffe_id) if spiffe_id else "the own trust domain"
        return (f"an intermediate in identity.cert names another trust domain than {td}: a "
                "CA that declares itself another domain's authority does not vouch for this "
                f"one; issue the certificate under a CA of {td} (its SPIFFE ID "
                f"spiffe://{td}, or none) (docs/identity.md, \"X.509-SVID rules\")")
    if rule in _SIGNER_RULES:
        return ("every intermediate in identity.cert must be a signing certificate: "
                "basicConstraints CA=true (critical), keyUsage keyCertSign, no "
                "extendedKeyUsage or one with both serverAuth and clientAuth, a SPIFFE ID "
                "naming the trust domain only (no path), a strong key and signature; "
                "re-issue it (docs/identity.md, \"X.509-SVID rules\")")
    return (f"identity.bundle ({bundle}) must hold the CA that issued the certificate "
            "(during a CA rotation: both CAs)")


def _check_loads_as_run(run: _Run, cfg: Any) -> None:
    """The identity files loaded by the very call ``sidecar run`` makes at start
    (``TlsState.load``: the SVID, the own and federated bundles, the trust store, the
    shadowing check and the TLS contexts). The checks above say what is wrong and what to
    do; this one makes sure nothing ``run`` refuses passes the pre-flight (a hostile review,
    session 34, found two checks the pre-flight skipped). Skipped when one of them failed."""
    from sidecar.tlsstate import TlsState

    g = "identity"
    title = "sidecar run loads the identity files"
    if any(r.group == g and r.status == "fail" for r in run.results):
        run.skip(g, title, "an identity check above failed")
        return
    ident = cfg.identity
    try:
        state = TlsState.load(ident.cert, ident.key, ident.bundle, ident.trust_domains)
    except Exception as exc:  # noqa: BLE001 -- SvidError, OSError (ssl.SSLError), ValueError...
        rule = getattr(exc, "rule", None)
        run.add(g, title, "fail", str(exc) if rule else f"{type(exc).__name__}: {exc}",
                "`sidecar run` refuses these files" + (
                    f" (rule {rule}, docs/identity.md lists the rules)" if rule else "")
                + ": fix the file the detail names")
        return
    run.add(g, title, "ok", f"{len(state.trust.bundles)} trust domain(s)")


def _check_trust_domains(run: _Run, cfg: Any, spiffe_id: str | None,
                         own_roots: list[Any] | None) -> None:
    """What ``sidecar run`` checks of the bundles besides the SVID: the own bundle's roots
    name no other trust domain, and every ``identity.trust_domains`` bundle parses, holds
    only its own trust domain's roots and is not the own trust domain's."""
    from sidecar.identity.svid import SvidError
    from sidecar.identity.trust import (
        TrustStore,
        bundle_from_certs,
        load_bundle,
        trust_domain_of,
    )

    g = "identity"
    ident = cfg.identity
    own_td = trust_domain_of(spiffe_id) if spiffe_id else None
    own = None
    if own_td is not None and own_roots is not None:
        title = "trust bundle holds only the own trust domain's roots"
        try:
            own = bundle_from_certs(own_td, ident.bundle, own_roots)
            run.add(g, title, "ok", own_td)
        except SvidError as exc:
            run.add(g, title, "fail", str(exc),
                    "give each trust domain its own bundle under identity.trust_domains "
                    "(docs/identity.md, \"Trust domains\")")
    federated = []
    for td, path in ident.trust_domains:
        title = f"federated bundle of {td} parses and names only {td}"
        if td == own_td:
            run.add(g, title, "fail", f"{td} is the sidecar's own trust domain",
                    "the own trust domain's bundle is identity.bundle: remove it from "
                    "identity.trust_domains")
            continue
        try:
            bundle = load_bundle(td, path)
        except SvidError as exc:
            run.add(g, title, "fail", str(exc),
                    f"identity.trust_domains.{td}.bundle in {cfg.source} must be a PEM or "
                    "SPIFFE trust bundle of that trust domain's roots")
            continue
        if not bundle.roots:
            run.add(g, title, "warn", f"{path}: no root: {td} admits nobody",
                    f"an empty bundle withdraws trust in {td}; if that is not meant, publish "
                    "its roots (PEM or SPIFFE bundle with x509-svid keys)")
            continue
        run.add(g, title, "ok", f"{path}: {len(bundle.roots)} root(s)")
        federated.append(bundle)
    if own is not None and federated:
        # As ``sidecar run`` builds its trust store: one CA (key) in two trust domains'
        # bundles, or a bundle certificate issued under another domain's root, is refused.
        title = "each CA vouches for one trust domain only"
        try:
            trust = TrustStore.build(own, federated)
            run.add(g, title, "ok", f"{1 + len(federated)} trust domains")
        except SvidError as exc:
            run.add(g, title, "fail", str(exc),
                    "keep each trust domain's roots in its own bundle only "
                    "(docs/identity.md, \"One CA, one trust domain\")")
            return
        _check_no_shadowing(run, cfg, trust)


def _check_no_shadowing(run: _Run, cfg: Any, trust: Any) -> None:
    """``no_shadowing``, as ``sidecar run`` applies it to the trust store and the own chain:
    no federated CA that OpenSSL's issuer lookup could take for another trust domain's CA
    (the own intermediate, the own root, another partner's root). The pre-flight built the
    trust store without it and passed such a bundle (a hostile review, session 34)."""
    from sidecar.identity.svid import SvidError
    from sidecar.tlsstate import load_own_svid, no_shadowing

    g = "identity"
    title = "no federated CA could be taken for another trust domain's CA"
    ident = cfg.identity
    try:
        svid = load_own_svid(ident.cert, ident.key, ident.bundle)
    except (SvidError, OSError, ValueError) as exc:
        # (reported by the checks above, or by "sidecar run loads the identity files")
        run.skip(g, title, f"the own certificate does not load: {getattr(exc, 'rule', exc)}")
        return
    try:
        no_shadowing(svid, trust)
    except SvidError as exc:
        run.add(g, title, "fail", str(exc),
                "OpenSSL takes a trusted CA whose key, or name and key identifier, match a "
                "certificate's issuer as that issuer: remove that CA from the file named, or "
                "the trust domain from identity.trust_domains, until its owner publishes it "
                "with a key and key identifier of its own (docs/identity.md, \"No partner CA "
                "stands for another trust domain's\")")
        return
    run.add(g, title, "ok")


# --- policy and JWKS --------------------------------------------------------------------------


def _check_policy(run: _Run, cfg: Any, spiffe_id: str | None, now: float,
                  offline: bool) -> None:
    from sidecar.errors import ConfigError
    from sidecar.policy.lint import lint
    from sidecar.policy.loader import load_policy_set

    g = "policy"
    if cfg.policy is None:
        # (With a policy, ``inbound.allow_from`` is refused while the config loads: it used
        # to be ignored without a word; a hostile review, session 29.)
        inbound = cfg.inbound
        run.skip(g, "policy loads", "no policy configured: " + (
            "no inbound listener" if inbound is None
            else "inbound admits the callers of inbound.allow_from" if inbound.allow_from
            else "inbound denies every request (no caller in inbound.allow_from)"))
        return
    # The policy as the sidecar loads it: its files and/or directories are one policy set.
    paths = list(cfg.policy_paths) or [cfg.policy]
    command_args = shlex.join(paths)
    try:
        policy = load_policy_set(paths)
    except ConfigError as exc:
        run.add(g, "policy loads", "fail", _problems(exc),
                f"fix the policy; `sidecar policy check {command_args}` lists every problem")
        run.skip(g, "policy lints clean", "policy does not load")
        return
    run.add(g, "policy loads", "ok",
            f"{cfg.policy} version {policy.short_version}, {policy.rule_count()} rule(s)")
    findings = [str(w) for w in lint(policy, now)]
    if findings:
        run.add(g, "policy lints clean", "warn",
                f"{len(findings)} finding(s), first: {findings[0]}",
                f"`sidecar policy lint {command_args}` lists them")
    else:
        run.add(g, "policy lints clean", "ok")
    if spiffe_id is not None and cfg.inbound is not None:
        if policy.section(spiffe_id) is None:
            run.add(g, "policy has a section for this identity", "warn", spiffe_id,
                    "without a section every inbound request is denied; add one under services")
        else:
            run.add(g, "policy has a section for this identity", "ok", spiffe_id)
    extras = policy.extras
    split = [f"{len(extras.rate_limits)} rate limit(s)"] if extras.rate_limits else []
    blocks = sum(1 for a in extras.alerts if a.block_seconds > 0)
    split += [f"{blocks} blocking alert(s)"] if blocks else []
    if cfg.workers > 1 and split:
        run.add(g, "limits hold across workers", "warn",
                f"workers: {cfg.workers} and {', '.join(split)}: each worker process counts "
                f"and blocks on its own, so a caller gets up to {cfg.workers} times a rate "
                f"limit's burst and a blocked caller's connections on the other workers go on",
                "run one worker per sidecar where these limits matter (docs/config.md "
                "\"workers\")")
    for provider in extras.jwt_providers.values():
        _check_provider(run, provider, offline)


def _url_fields(provider: Any) -> list[tuple[str, str]]:
    """Every URL a provider names (``jwks_uri``, and discovery when the schema has it)."""
    out = []
    for f in fields(provider):
        value = getattr(provider, f.name)
        if isinstance(value, str) and (f.name.endswith("_uri") or f.name.endswith("_url")):
            out.append((f.name, value))
    return out


def _check_provider(run: _Run, provider: Any, offline: bool) -> None:
    from sidecar.authn.jwks import parse_jwks
    from sidecar.errors import ConfigError
    from sidecar.jwks_fetch import load_jwks_file

    g = "jwks"
    name = provider.name
    if provider.jwks_file is not None:
        title = f"JWKS file of provider {name} parses"
        try:
            keys = load_jwks_file(provider.jwks_file)
            if keys.withdrawn:  # (loads, and leaves the provider without keys)
                run.add(g, title, "fail", f"{provider.jwks_file}: no usable signature key",
                        "every token of the provider is refused (no_keys)")
            else:
                run.add(g, title, "ok", f"{provider.jwks_file}: {len(keys)} key(s)")
        except ConfigError as exc:
            run.add(g, title, "fail", _problems(exc),
                    f"jwt_providers.{name}.jwks_file must be a readable JWKS document")
    for key, url in _url_fields(provider):
        title = f"{key} of provider {name} answers"
        if offline:
            run.skip(g, title, "--offline")
            continue
        # Shown as scheme and host only: a fetched URL's path or query may hold a token
        # (found by a hostile review: the whole URL, password and token, was printed).
        shown = shown_url(url)
        try:
            body = _fetch_https(url, getattr(provider, "jwks_ca", None))
        except Exception as exc:  # noqa: BLE001 -- every failure is one line for the operator
            run.add(g, title, "fail", f"{shown}: {_scrubbed(exc, url)}",
                    "check the URL, DNS and the network path from this host; "
                    f"jwt_providers.{name}.jwks_ca if the server uses a private CA")
            continue
        if key == "jwks_uri":
            try:
                keys = parse_jwks(body, shown)
            except ConfigError as exc:
                run.add(g, title, "fail", _problems(exc), "the URL must serve a JWKS document")
                continue
            if keys.withdrawn:
                run.add(g, title, "fail", f"{shown}: no usable signature key",
                        "every token of the provider is refused (no_keys)")
            else:
                run.add(g, title, "ok", f"{shown}: {len(keys)} key(s)")
        elif key == "discovery_url":
            _check_discovery(run, provider, title, url, body)
        else:
            try:
                read_json(body)
            except ValueError:  # (JsonDocError: not JSON, a member twice, too deep)
                run.add(g, title, "fail", f"{shown}: not JSON",
                        "the URL must serve a JSON document")
                continue
            run.add(g, title, "ok", shown)


def _scrubbed(exc: BaseException, url: str) -> str:
    """``exc``'s message with ``url`` shown as scheme and host only (``shown_url``)."""
    from sidecar.jwks_fetch import scrubbed

    return scrubbed(str(exc), url)


def _check_discovery(run: _Run, provider: Any, title: str, url: str, body: bytes) -> None:
    """Issuer metadata: JSON naming the provider's issuer, whose ``jwks_uri`` serves keys."""
    from sidecar.authn.jwks import parse_jwks
    from sidecar.errors import ConfigError

    hint = ("the metadata must name the provider's issuer exactly and a jwks_uri "
            "(OpenID Connect Discovery 1.0 / RFC 8414)")
    shown = shown_url(url)  # (both URLs as scheme and host only: see _check_provider)
    try:
        doc = read_json(body)
    except ValueError:
        run.add("jwks", title, "fail", f"{shown}: not JSON", hint)
        return
    if not isinstance(doc, dict) or doc.get("issuer") != provider.issuer:
        got = doc.get("issuer") if isinstance(doc, dict) else None
        run.add("jwks", title, "fail", f"{shown}: issuer {got!r}, expected {provider.issuer!r}",
                hint)
        return
    jwks_uri = doc.get("jwks_uri")
    if not isinstance(jwks_uri, str):
        run.add("jwks", title, "fail", f"{shown}: no jwks_uri", hint)
        return
    shown_jwks = shown_url(jwks_uri)
    try:
        keys = parse_jwks(_fetch_https(jwks_uri, getattr(provider, "jwks_ca", None)),
                          shown_jwks)
    except ConfigError as exc:
        run.add("jwks", title, "fail", _problems(exc), "the jwks_uri must serve a JWKS document")
        return
    except Exception as exc:  # noqa: BLE001 -- every failure is one line for the operator
        run.add("jwks", title, "fail", f"{shown_jwks}: {_scrubbed(exc, jwks_uri)}", hint)
        return
    run.add("jwks", title, "ok", f"{shown} -> {shown_jwks}: {len(keys)} key(s)")


def _fetch_https(url: str, ca_file: str | None) -> bytes:
    import trio

    from sidecar.jwks_fetch import fetch_jwks, jwks_ssl_context

    async def go() -> bytes:
        return await fetch_jwks(url, jwks_ssl_context(ca_file), connect_timeout=HTTP_TIMEOUT,
                                read_timeout=HTTP_TIMEOUT)

    return trio.run(go)


# --- ports and audit --------------------------------------------------------------------------


def _listeners(cfg: Any) -> list[tuple[str, tuple[str, int]]]:
    out: list[tuple[str, tuple[str, int]]] = []
    if cfg.inbound is not None:
        out.append(("inbound.listen", cfg.inbound.listen))
    for ob in cfg.outbound:
        out.append((f"outbound {ob.name} listen", ob.listen))
    if cfg.admin.listen is not None:
        out.append(("admin.listen", cfg.admin.listen))
    if cfg.admin.health_listen is not None:
        out.append(("admin.health_listen", cfg.admin.health_listen))
    return out


def _check_ports(run: _Run, cfg: Any) -> None:
    g = "ports"
    for key, (host, port) in _listeners(cfg):
        title = f"can listen on {host}:{port} ({key})"
        if port == 0:
            run.skip(g, title, "port 0: the system picks a free port")
            continue
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            family, kind, proto, _, addr = infos[0]
            with socket.socket(family, kind, proto) as s:
                # As the listeners do: a port in TIME_WAIT is free, one in LISTEN is not.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(addr)
                s.listen(1)
        except OSError as exc:
            hint = (f"another process listens on port {port} (is this sidecar already "
                    f"running?); stop it or change {key}")
            if exc.errno in (13,):
                hint = f"ports below 1024 need privileges; change {key}"
            elif isinstance(exc, socket.gaierror):
                hint = f"{key}: {host!r} does not resolve on this host"
            run.add(g, title, "fail", exc.strerror or str(exc), hint)
            continue
        run.add(g, title, "ok")


def _check_audit(run: _Run, cfg: Any, keyring: Any = None) -> None:
    g = "audit"
    audit = cfg.audit
    if audit is None:
        run.skip(g, "audit directory writable", "no audit trail configured")
        return
    path = audit.path
    probe_dir = path
    while not os.path.isdir(probe_dir):
        parent = os.path.dirname(probe_dir.rstrip(os.sep)) or "."
        if parent == probe_dir:
            break
        probe_dir = parent
    title = "audit directory writable"
    if os.path.exists(path) and not os.path.isdir(path):
        run.add(g, title, "fail", f"{path} exists and is not a directory",
                "audit.path names a directory of segment files")
    else:
        try:
            fd, probe = tempfile.mkstemp(prefix=".sidecar-check-", dir=probe_dir)
            os.close(fd)
            os.unlink(probe)
            where = path if probe_dir == path else f"{path} (created at start, in {probe_dir})"
            run.add(g, title, "ok", where)
        except OSError as exc:
            run.add(g, title, "fail", f"{probe_dir}: {exc.strerror or exc}",
                    "the sidecar's user must be able to create files in audit.path")
    # Every file the audit section names must be present and usable: the keys are parsed
    # as the sidecar will (it refuses to start otherwise), the ship TLS files read.
    files = [(f"audit.{f.name}", getattr(audit, f.name)) for f in fields(audit)]
    ship = getattr(audit, "ship", None)
    if ship is not None:
        files += [(f"audit.ship.{f.name}", getattr(ship, f.name)) for f in fields(ship)]
    for key, value in files:
        if key.endswith("_file") and isinstance(value, str) and value:
            _check_audit_file(run, key, value, keyring)


# How each audit key file is read (as the sidecar reads it), and how to make one.
_AUDIT_KEY_HINTS = {
    "audit.hmac_key_file": "create {value} (docs/audit.md) or remove audit.hmac_key_file",
    "audit.signing_key_file": "make one with `sidecar audit keygen PREFIX` (PREFIX.key; "
                              "PREFIX.pub verifies) or remove audit.signing_key_file",
    "audit.encryption_key_file": "make one with `sidecar audit keygen --data-key PREFIX` "
                                 "(PREFIX.data) or remove audit.encryption_key_file",
}


def _audit_key_detail(key: str, value: str, keyring: Any) -> str:
    """What the file holds (``ValueError``/``OSError`` when it is not usable)."""
    from sidecar.audit.crypto import data_key_id, load_data_key
    from sidecar.audit.signing import load_signer
    from sidecar.config.audit import load_hmac_key

    if key == "audit.hmac_key_file":
        load_hmac_key(value)
        return value
    if key == "audit.signing_key_file":
        kid = load_signer(value, "check").kid
        if keyring is not None and kid not in keyring.keys:
            raise ValueError(f"{value}: key id {kid} is not among the --pubkey keys: "
                             "verify --pubkey would not accept its checkpoints")
        return f"{value} (Ed25519, key id {kid})"
    if key == "audit.encryption_key_file":
        return f"{value} (AES-256, key id {data_key_id(load_data_key(value))})"
    read_regular(value, 1)
    return value


def _check_audit_file(run: _Run, key: str, value: str, keyring: Any) -> None:
    title = f"{key} present"
    try:
        detail = _audit_key_detail(key, value, keyring)
    except (OSError, ValueError) as exc:
        hint = _AUDIT_KEY_HINTS.get(key, f"create {value} or remove {key} (docs/audit.md)")
        run.add("audit", title, "fail", str(exc), hint.format(value=value))
        return
    run.add("audit", title, "ok", detail)


# --- entry points -----------------------------------------------------------------------------


def static_checks(config_path: str, now: float, *, offline: bool = False, ports: bool = True,
                  min_validity: float = DEFAULT_MIN_VALIDITY,
                  keyring: Any = None) -> list[CheckResult]:
    """Every check of a config file and the files it names (see the module docstring).
    ``keyring`` (``--pubkey``): the audit signing key must be one of its keys."""
    from sidecar.config.model import load_config_file
    from sidecar.errors import ConfigError

    run = _Run()
    try:
        cfg = load_config_file(config_path)
    except ConfigError as exc:
        run.add("config", "config file parses", "fail", _problems(exc),
                "each line names file:line and key; docs/config.md lists every key")
        return run.results
    except OSError as exc:
        run.add("config", "config file parses", "fail", f"{config_path}: {exc.strerror or exc}",
                "pass the sidecar config file with -c")
        return run.results
    run.add("config", "config file parses", "ok", config_path)
    spiffe_id = _check_identity(run, cfg, now, min_validity)
    _check_policy(run, cfg, spiffe_id, now, offline)
    if ports:
        _check_ports(run, cfg)
    _check_audit(run, cfg, keyring)
    return run.results


class AdminUnreadable(Exception):
    """A read of the admin server failed (the message is one line, for a check's detail)."""


def admin_target(admin: str) -> Target:
    """``--admin URL`` as the control-plane client's target (``ClientError``: not an
    ``http://HOST:PORT`` URL)."""
    where = parse_url(admin, schemes=("http",))
    if urlsplit(admin).port is None:  # (parse_url checked the port)
        where = Target(where.scheme, where.host, DEFAULT_ADMIN_PORT, where.target,
                       f"{where.authority}:{DEFAULT_ADMIN_PORT}")
    return where


def _get(base: Target, path: str, max_bytes: int = MAX_ANSWER_BYTES) -> tuple[int, bytes]:
    """One ``GET`` of the admin server through the control-plane client
    (``sidecar.ctlhttp.client``): connect and answer deadlines, bounded head and body, a
    status of 100-599, no control characters in the head, at most 8 1xx answers. Any
    failure is an ``AdminUnreadable`` with a one-line message (found by a hostile review:
    ``http.client`` ended a wrong status line, a huge head or a dropped connection in a
    traceback, and had no bound on a server that trickles its answer)."""
    target = Target(base.scheme, base.host, base.port,
                    base.target.partition("?")[0].rstrip("/") + path, base.authority)
    try:
        answer = trio.run(functools.partial(
            request, target, connect_timeout=HTTP_TIMEOUT, read_timeout=HTTP_TIMEOUT,
            max_body_bytes=max_bytes))
    except ClientError as exc:
        raise AdminUnreadable(f"{path}: {_printable(str(exc))[:MAX_ERROR_CHARS]}") from None
    return answer.status, answer.body


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            if head.split("{", 1)[0] == name:
                try:
                    return float(value)
                except ValueError:
                    return None
    return None


def live_checks(admin: str, now: float, *, min_validity: float = DEFAULT_MIN_VALIDITY,
                keyring: Any = None) -> list[CheckResult]:
    """Ask a running sidecar's admin server (``http://127.0.0.1:15000``) how it is;
    ``keyring`` (``--pubkey``) verifies the signature of its audit head. A read that fails
    (no answer, a malformed or oversized one, a deadline) fails the check that made it, and
    the checks after it are skipped: one line each, never a traceback."""
    run = _Run()
    g = "live"
    first = f"admin endpoint answers ({admin})"
    titles = ["sidecar is ready", "certificate not near expiry",
              "policy loaded without reload error", "audit head"]
    try:
        base = admin_target(admin)
        status, _ = _get(base, "/healthz")
        if status != 200:
            raise AdminUnreadable(f"/healthz answered {status}")
        run.add(g, first, "ok")
    except (ClientError, AdminUnreadable) as exc:
        run.add(g, first, "fail", str(exc),
                "is the sidecar running, and is admin.listen this address?")
        for t in titles:
            run.skip(g, t, "admin endpoint unreachable")
        return run.results
    try:
        _live(run, g, titles, base, now, min_validity, keyring)
    except AdminUnreadable as exc:
        done = len(run.results) - 1  # the live checks already reported
        run.add(g, titles[done], "fail", f"admin endpoint failed: {exc}",
                "is admin.listen this sidecar's admin server? the sidecar log says more")
        for t in titles[done + 1:]:
            run.skip(g, t, "admin endpoint failed")
    return run.results


def _json_answer(base: Target, path: str) -> tuple[int, Any]:
    """``GET path``: the status and the body as JSON (its text when it is not JSON)."""
    code, body = _get(base, path)
    try:
        return code, json.loads(body) if body else None
    except (ValueError, RecursionError):
        return code, body.decode("utf-8", "replace")


def _live(run: _Run, g: str, titles: list[str], base: Target, now: float,
          min_validity: float, keyring: Any) -> None:
    """The live checks after ``/healthz``, in the order of ``titles``."""
    code, doc = _json_answer(base, "/readyz")
    if code == 200:
        run.add(g, titles[0], "ok")
    else:
        reasons = doc.get("reasons") if isinstance(doc, dict) else None
        shown = (", ".join(_printable(str(r)) for r in reasons[:MAX_DETAIL_LINES])
                 if isinstance(reasons, list) and reasons else str(code))
        run.add(g, titles[0], "fail", f"not ready: {shown}",
                "docs/operations.md explains each reason code; the sidecar log says more")
    code, metrics = _get(base, "/metrics", MAX_METRICS_BYTES)
    expiry = _metric(metrics.decode("utf-8", "replace"), "sidecar_certificate_expiry_timestamp_seconds")
    if code != 200 or not expiry or not math.isfinite(expiry):
        run.skip(g, titles[1], "no certificate expiry metric")
    elif expiry <= now:
        run.add(g, titles[1], "fail", "certificate expired",
                "the sidecar keeps refusing traffic until a valid certificate is written")
    elif expiry - now < min_validity:
        run.add(g, titles[1], "warn", f"{_duration(expiry - now)} left",
                "rotation should have renewed it by now: check cert-manager / SPIRE")
    else:
        run.add(g, titles[1], "ok", f"{_duration(min(expiry - now, MAX_SHOWN_SECONDS))} left")
    code, doc = _json_answer(base, "/policy")
    if code != 200 or not isinstance(doc, dict):
        run.add(g, titles[2], "fail", f"/policy answered {code}", "upgrade or restart the sidecar")
    elif doc.get("last_reload_error"):
        run.add(g, titles[2], "fail", _printable(str(doc["last_reload_error"])),
                "the last good policy stays in force; fix the file and it reloads")
    elif not doc.get("version"):
        run.add(g, titles[2], "skip" if not doc.get("source") else "fail",
                "no policy configured" if not doc.get("source") else "policy not loaded",
                "the sidecar denies every request until the policy loads")
    else:
        run.add(g, titles[2], "ok", f"version {_printable(str(doc['version'])[:12])}")
    _check_audit_head(run, g, titles[3], functools.partial(_json_answer, base), now, keyring)


def _printable(text: str) -> str:
    """``text`` with non-printable characters (controls, line ends) as escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _check_audit_head(run: _Run, g: str, title: str, answer: Callable[[str], tuple[int, Any]],
                      now: float, keyring: Any) -> None:
    """The newest signed checkpoint (``/audit/head``): present, well formed, its seq and
    time; with ``--pubkey`` its signature verified. The effective config (``/config``)
    says whether one is expected at all."""
    from sidecar.audit.signing import Checkpoint
    from sidecar.output import rfc3339

    code, cfg = answer("/config")
    audit = cfg.get("audit") if code == 200 and isinstance(cfg, dict) else None
    known = code == 200 and isinstance(cfg, dict)
    code, doc = answer("/audit/head")
    if code == 404:
        if not known:
            run.skip(g, title, "not available (this sidecar does not serve /audit/head)")
        elif not isinstance(audit, dict):
            run.skip(g, title, "no audit trail configured")
        elif not audit.get("signing_key_file"):
            run.skip(g, title, "audit signing is off (audit.signing_key_file not set)")
        else:
            every = (audit.get("checkpoint_every_records"),
                     audit.get("checkpoint_every_seconds"))
            run.add(g, title, "warn", "audit signing is on but no signed checkpoint yet",
                    f"the first is written after {every[0]} records, or {every[1]} s after "
                    "the first unsigned record; if traffic has flowed, the audit trail may "
                    "not be writable: see the sidecar log")
        return
    if code != 200:
        run.add(g, title, "fail", f"/audit/head answered {code}",
                "the audit trail may not be writable; see the sidecar log")
        return
    try:
        cp = Checkpoint.from_json(doc.get("checkpoint") if isinstance(doc, dict) else None)
        signed = cp.time
        detail = (f"signed checkpoint at seq {cp.seq}, {rfc3339(signed)} "
                  f"({_duration(max(0.0, now - signed))} ago), key {_printable(cp.kid)[:80]}")
        problem = (keyring.check(cp.seq, cp.prev, cp.kind, cp.body())
                   if keyring is not None else None)
    except (ValueError, TypeError, OverflowError, OSError) as exc:
        # (a time that is no number or out of range, a field the signature check cannot
        # encode: an answer that is no checkpoint, from whatever serves that port)
        run.add(g, title, "fail", f"/audit/head: {_printable(str(exc))[:MAX_ERROR_CHARS]}",
                "upgrade or restart the sidecar")
        return
    if keyring is not None:
        if problem is not None:
            run.add(g, title, "fail", f"{detail}: {problem}",
                    "--pubkey must be the public half of audit.signing_key_file "
                    "(sidecar audit keygen wrote it as PREFIX.pub)")
            return
        detail += ", signature verified"
    run.add(g, title, "ok", detail)


def render_table(results: list[CheckResult], colour: bool) -> str:
    """The results as the table: by group, one line each with its hint under it, then the
    verdict."""
    lines: list[str] = []
    group = None
    meaning = {"ok": "ok", "warn": "warn", "fail": "fail", "skip": "dim"}
    for r in results:
        if r.group != group:
            group = r.group
            lines.append(paint(group, "bold", colour))
        # Details and hints quote the config's values (file paths): each line ``safe``.
        detail = safe_lines(r.detail) if r.detail else []
        first = f": {detail[0]}" if detail else ""
        lines.append(f"  {paint(MARKS[r.status], meaning[r.status], colour)} "
                     f"{safe(r.title)}{first}")
        lines.extend(f"           {d}" for d in detail[1:])
        if r.hint:
            lines.extend(f"           {'hint: ' if i == 0 else ''}{h}"
                         for i, h in enumerate(safe_lines(r.hint)))
    failed = sum(r.status == "fail" for r in results)
    warned = sum(r.status == "warn" for r in results)
    verdict = (paint(f"{failed} check(s) failed", "fail", colour) if failed
               else paint("all checks passed", "ok", colour))
    lines.append(f"\n{verdict}" + (f", {warned} warning(s)" if warned else ""))
    return "\n".join(lines)


def document(results: list[CheckResult]) -> dict[str, Any]:
    """The ``-o json|yaml`` document (stable; docs/operations.md)."""
    return {
        "kind": "CheckReport",
        "ok": not any(r.status == "fail" for r in results),
        "checks": [asdict(r) for r in results],
    }


def cmd_check(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """0 when no check failed, 1 when one did, 2 for bad usage."""
    from sidecar.identity.cli import parse_ttl

    stream = out or sys.stdout
    if not args.config and not args.admin:
        print("sidecar check: give -c FILE, --admin URL, or both", file=sys.stderr)
        return 2
    if args.admin:
        try:
            admin_target(args.admin)
        except ClientError:
            print(f"sidecar check: --admin {args.admin!r}: expected http://HOST:PORT "
                  "(the admin server speaks plain HTTP on loopback)", file=sys.stderr)
            return 2
    try:
        min_validity = float(parse_ttl(args.min_validity))
    except argparse.ArgumentTypeError as exc:
        print(f"sidecar check: --min-validity: {exc}", file=sys.stderr)
        return 2
    keyring = None
    if args.pubkey:
        from sidecar.audit.signing import load_keyring

        try:
            keyring = load_keyring(args.pubkey)
        except ValueError as exc:
            print(f"sidecar check: --pubkey: {exc}", file=sys.stderr)
            return 2
    now = time.time()
    results: list[CheckResult] = []
    if args.config:
        results += static_checks(args.config, now, offline=args.offline,
                                 ports=not args.no_ports, min_validity=min_validity,
                                 keyring=keyring)
    if args.admin:
        results += live_checks(args.admin, now, min_validity=min_validity, keyring=keyring)
    emit(args, document(results), lambda: render_table(results, use_colour(stream)), stream)
    return 1 if any(r.status == "fail" for r in results) else 0


def add_check_parser(subparsers: Any) -> None:
    """Register ``sidecar check`` under an argparse subparsers object."""
    p = subparsers.add_parser(
        "check", help="pre-flight checks of a config (and live checks of a running sidecar)",
        description="One line per check; exit 1 when any check fails (warnings do not).")
    p.add_argument("-c", "--config", help="sidecar config file to check")
    p.add_argument("--admin", metavar="URL",
                   help="also check a running sidecar through its admin server, "
                        "e.g. http://127.0.0.1:15000")
    p.add_argument("--offline", action="store_true",
                   help="do not contact JWKS / discovery URLs")
    p.add_argument("--no-ports", action="store_true",
                   help="do not try to bind the listen ports (e.g. next to a running sidecar)")
    p.add_argument("--min-validity", default="1h", metavar="DURATION",
                   help="warn when the certificate has less left than this (default 1h; "
                        "also warned below a third of its lifetime)")
    p.add_argument("--pubkey", action="append", default=[], metavar="FILE",
                   help="audit public key(s) (sidecar audit keygen's PREFIX.pub): the "
                        "signing key must match, and the live audit head's signature verify")
    add_output_flag(p)
    p.set_defaults(func=cmd_check)


def run_check_errors(config_path: str) -> list[CheckResult]:
    """The failures ``sidecar run --check`` reports: the offline file checks only."""
    return [r for r in static_checks(config_path, time.time(), offline=True, ports=False)
            if r.status == "fail"]


__all__ = ["CheckResult", "add_check_parser", "cmd_check", "live_checks", "run_check_errors",
           "static_checks"]
