"""The twenty-seventh and twenty-eighth sessions' header reviews: families the catalogue lacked,
and the cost of a long run of wrappers (sidecar.http.untrusted).

Framework adapters' internal headers (Astro's x-astro-path, CVE-2026-33768; OpenNext's x-isr;
vinext's x-vinext-mw-ctx; Traefik's X-Replaced-Path), more edges' client addresses (Tencent
EdgeOne, Alibaba ESA, CDNetworks) and the verdicts WAFs and bot managers insert for the app
(AWS WAF's x-amzn-waf-*, EdgeOne's EO-Bot-Tag, Fastly Next-Gen WAF's X-SigSci-*, DataDome's
X-DataDome-*) reached the app in every spelling on both listeners. Each is sent here in every
spelling tests/test_header_catalogue.py uses (case, ``_``, behind each wrapper, values a reader
trims or splits) through real sidecars, with and without ``allow_underscores``.

A name of ``Http-Http-...-X`` was decided in time quadratic in its length (each wrapper peeled
copied and hashed the rest): now at most ``MAX_WRAPPERS`` are looked at and a longer run is
removed whatever it wraps. The work is bounded by counting the lines run in the module (a name
of 10,000 wrappers runs as many as one of ``MAX_WRAPPERS + 1``) and by a generous ratio against
a plain name of the same length in the same process -- no absolute timing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest

import sidecar.http.untrusted as untrusted
from sidecar.http.untrusted import (
    MAX_WRAPPERS,
    NOT_IN_PREFIX,
    WRAPPERS,
    HeaderFilter,
    entry_for,
)
from tests.test_header_catalogue import (
    CLAIM_HEADER,
    MARK,
    _forwarded_lines,
    _leaks,
    _send_lines,
    _spellings,
    _wrapped,
    mesh,
    mesh_us,
)
from tests.test_hostile_http import SIDES, Mesh

# Every request here must end in a generic answer, never in an unhandled exception.
pytestmark = pytest.mark.usefixtures("no_internal_errors")

__all__ = ["mesh", "mesh_us"]  # the shared module fixtures (two real sidecar pairs)

# One or more members of each family, as the product spells them. Listed here, not derived
# from CATALOGUE, so that each test fails if its entry is taken out again.
REVIEW27_FOUND = [
    # Astro's adapters (CVE-2026-33768: x-astro-path runs another path)
    "X-Astro-Path", "X-Astro-Locals", "X-Astro-Middleware-Secret",
    # OpenNext: the middleware skip, its internal headers and its geolocation
    "X-ISR", "x-opennext-initial-url", "x-opennext-resolved-routes", "x-opennext-locale",
    "x-opennext-rewrite-status-code", "x-open-next-city", "x-open-next-country",
    "x-open-next-region", "x-open-next-latitude", "x-open-next-longitude",
    # vinext; the rest of Next.js's INTERNAL_HEADERS
    "x-vinext-mw-ctx", "x-vinext-internal-authorization", "x-vinext-internal-request-cf",
    "x-vinext-prerender-secret", "x-vinext-static-file", "x-nextjs-data",
    "x-next-resume-state-length",
    # Traefik's ReplacePath
    "X-Replaced-Path",
    # edges' client addresses and what they derived from the connection
    "EO-Connecting-IP", "EO-Client-IP", "ali-real-client-ip", "Ali-Cdn-Real-Port", "Cdn-Src-Ip",
    "ali-ip-country", "ali-ip-city", "Tls-Ja3", "Tls-Ja4", "Tls-Hash", "Geo-Country-Code",
    "X-Client-Scheme",
    # WAF and bot-management verdicts
    "EO-Bot-Tag", "x-amzn-waf-bot", "x-amzn-waf-verified", "x-amzn-waf-sample",
    "X-SigSci-AgentResponse", "X-SigSci-Tags", "X-SigSci-RequestID", "X-DataDome-IsBot",
    "X-DataDome-BotName", "X-DataDome-CaptchaPassed", "X-DataDome-RuleType",
]
# Names next to the new entries that are nobody's verdict: forwarded (the control). DataDome's
# client id is what the client's own script sends, verified by the DataDome module.
# The twenty-eighth session's review: grpc-gateway's own namespace (a caller's copy of the key
# its matcher makes of Authorization), more platforms' user facts, run-as headers of other APIs.
REVIEW28_FOUND = [
    "Grpcgateway-Authorization", "Grpcgateway-Cookie", "grpcgateway-x-user",
    "x-endpoint-api-consumer-type", "x-endpoint-api-consumer-number",
    "x-endpoint-api-project-id", "x-endpoint-api-userinfo", "x-amzn-ava-user-context",
    "kubeflow-userid", "kubeflow-groups", "sf-context-current-user",
    "sf-context-current-user-token", "rstudio-connect-credentials", "shiny-server-credentials",
    "x-sp-userid", "x-sp-usergroups", "x-token-user-email", "x-token-user-name",
    "x-token-user-roles", "domino-username", "x-warpgate-username",
    "x-warpgate-authentication-type",
    "Sudo", "X-Redmine-Switch-User", "Api-Username", "X-On-Behalf-Of",
    "opendistro-security-impersonate-as",
]
# The fourth round (session 29): web access management agents, F5 / vTM and GlassFish
# certificate and proxy headers, IIS's Windows identity, Microsoft run-as headers, Cloud
# Foundry route services, AD FS, Tencent's scheme headers.
REVIEW29_FOUND = [
    "ct-remote-user", "ctemail", "Oblix-Uid", "oblix-firstname", "oblix-lastname", "oblix-mail",
    "SSLClientCert", "SSLClientCertStatus", "SSLClientCertHash", "SSLClientCertIssuer",
    "SSLClientCertSubject", "SSLClientCertSerialNumber", "SSLClientCertSN", "SSLClientCertb64",
    "SSLClientCertNotValidBefore", "SSLClientCertNotValidAfter", "SSLClientCertVersion",
    "SSLClientCertSignatureAlgorithm", "SSLClientCertSubjectPublicKey", "SSLClientCipher",
    "SSLSessionID", "X-IIS-WindowsAuthToken", "x-iisnode-AUTH-USER", "x-iisnode-LOGON-USER",
    "MSCRMCallerID", "CallerObjectId", "X-TFS-Impersonate", "X-TFS-SubjectDescriptorImpersonate",
    "Proxy-ip", "Proxy-keysize", "Proxy-secret-keysize", "Proxy-cipher", "Proxy-issuer-dn",
    "Proxy-user-dn", "Proxy-jroute", "X-CF-Forwarded-Url", "X-CF-Proxy-Signature",
    "X-CF-Proxy-Metadata", "X-CF-ApplicationID", "X-CF-InstanceID", "X-CF-InstanceIndex",
    "X-MS-Forwarded-Client-IP", "X-MS-Proxy", "X-MS-Endpoint-Absolute-Path",
    "X-MS-Client-Application", "X-MS-Client-User-Agent", "X-Client-Proto", "X-Client-Proto-Ver",
    "X-Api-Scheme",
]
# Found by the thirtieth session's review (probe-headers5): run-as headers of APIs, platform
# user assertions, tenant selection, header enrichment, Search Guard, OpenStack system scope.
REVIEW30_FOUND = [
    "OpenStack-System-Scope", "X-Service-Domain-Id", "X-Service-Domain-Name",
    "X-ASRS-User-Id", "X-ASRS-User-Claims", "X-ASRS-Connection-Id", "ce-userId",
    "Mattermost-User-Id", "WorkloadAccessToken", "X-Amzn-Bedrock-AgentCore-Runtime-User-Id",
    "X-OpenWebUI-User-Id", "X-OpenWebUI-User-Email", "X-OpenWebUI-User-Role",
    "X-Streamlit-User", "X-Streamlit-User-Email", "X-Grafana-User", "Stripe-Account",
    "Stripe-Context", "As-User", "Dropbox-API-Select-User", "Dropbox-API-Select-Admin",
    "PayPal-Auth-Assertion", "X-OpenIDM-RunAs", "X-Appwrite-Impersonate-User-Id", "User-Name",
    "X-Trino-User", "X-Presto-User", "X-Trino-Original-User", "sg-impersonate-as", "sg-tenant",
    "AccountID", "ProjectID", "securitytenant", "sgtenant", "X-Grafana-Org-Id", "username",
    "X-MSISDN", "MSISDN", "X-Up-Calling-Line-Id", "X-Nokia-MSISDN", "X-Up-Subno",
    "X-H3G-MSISDN", "Https", "dapr-app-id", "appengine-user-ip",
]
# Found by the thirty-second session's review (probe-headers32): trusted-proxy user and host
# headers of products that read them by default.
REVIEW32_FOUND = [
    "X-Alfresco-Remote-User", "X-RStudio-Username", "Auth-User", "Auth-Mail",
    "X-ProxiedEntitiesChain", "X-ProxiedIssuersChain", "X-ProxiedEntityGroups",
    "X-ProxyScheme", "X-ProxyHost", "X-ProxyPort", "X-ProxyContextPath", "DISGUISED-HOST",
    "X-Replit-User-Id", "X-Replit-User-Name", "X-Replit-User-Roles", "X-Replit-User-Teams",
]
REVIEW32_KEPT = ["auth", "x-alfresco", "x-rstudio-session", "x-proxied",
                 "x-replit", "disguised", "authorization-hint", "x-proxyless"]
REVIEW30_KEPT = ["ce-type", "ce-source", "ce-id", "x-asr", "mattermost-channel-id",
                 "stripe-version", "x-trino-source", "x-grafana-device-id", "usernames",
                 "msisdn-hint", "dapr-app-port"]
REVIEW29_KEPT = ["x-cf-app-instance", "x-ms-client-request-id", "oblix", "ssl", "x-iis",
                 "sslsession", "proxy-id", "x-client-protocol-hint"]
REVIEW28_KEPT = ["sudoers", "x-sp", "kubeflow", "x-token-use", "grpcgateway", "api-user"]
REVIEW27_KEPT = ["X-DataDome-ClientID", "x-astronaut", "x-isrc", "x-isr-mode", "x-opennexus",
                 "eo-other", "cdn-src", "x-replaced", "x-sigsci", "tls-version", "x-client-sch"]


def _filters() -> list[HeaderFilter]:
    out = [HeaderFilter(), HeaderFilter(allow_underscores=True),
           HeaderFilter(allow_underscores=True, pass_through=["x-forwarded-host"])]
    for f in out:
        f.set_claim_headers([CLAIM_HEADER])
    return out


@pytest.mark.parametrize("name", REVIEW27_FOUND + REVIEW28_FOUND + REVIEW29_FOUND
                         + REVIEW30_FOUND + REVIEW32_FOUND)
def test_headers_the_twenty_seventh_review_found_are_in_the_catalogue(name: str) -> None:
    assert entry_for(name) is not None and entry_for(name.replace("-", "_")) is not None, name
    for f in _filters():
        for spelling in [*_spellings(name), *_wrapped(name)]:
            assert f.removes(spelling.lower().encode()), spelling


@pytest.mark.parametrize("name", REVIEW27_KEPT + REVIEW28_KEPT + REVIEW29_KEPT + REVIEW30_KEPT
                         + REVIEW32_KEPT)
def test_names_next_to_the_new_entries_are_kept(name: str) -> None:
    assert entry_for(name) is None, name
    for f in _filters():
        assert not f.removes(name.lower().encode()), name
    assert "x-datadome-clientid" in NOT_IN_PREFIX


def _review27_lines(wrapped_underscores: bool) -> list[bytes]:
    """Every member in every spelling (case, ``_``, values trimmed, listed, repeated, the name
    percent-encoded) and behind every wrapper in each of its spellings, one or two deep."""
    found = REVIEW27_FOUND + REVIEW28_FOUND + REVIEW29_FOUND + REVIEW30_FOUND + REVIEW32_FOUND
    kept = REVIEW27_KEPT + REVIEW28_KEPT + REVIEW29_KEPT + REVIEW30_KEPT + REVIEW32_KEPT
    lines = [line for n in found for line in _forwarded_lines(n)]
    for n in found:
        lines += [f"{s}: {MARK}\r\n".encode() for s in _wrapped(n)
                  if wrapped_underscores or "_" not in s]
    return lines + [f"{n}: {MARK}\r\n".encode() for n in kept]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("which", ["default", "underscores_and_pass_through"])
def test_twenty_seventh_review_families_never_reach_the_app(mesh: Mesh, mesh_us: Mesh,
                                                            side: str, which: str) -> None:
    m = mesh if which == "default" else mesh_us
    # (by default names with "_" are dropped whole: sent, but they say nothing of the entries)
    lines = _review27_lines(which != "default")
    heads = []  # (a connection per 1,200 lines: one exchange's timeout bounds each)
    for i in range(0, len(lines), 1200):
        heads += _send_lines(m, side, lines[i:i + 1200])
    assert sorted(_leaks(heads)) == sorted((n.lower(), MARK)
                                           for n in REVIEW27_KEPT + REVIEW28_KEPT
                                           + REVIEW29_KEPT + REVIEW30_KEPT + REVIEW32_KEPT)


# (The review's CVE-2026-33768 request itself: tests/test_header_catalogue.py, REROUTES.)


# --- the run of wrappers: bounded work ---------------------------------------------------------


def _run(wrappers: list[str], inner: str) -> bytes:
    return ("".join(wrappers) + inner).encode()


def test_a_run_of_wrappers_up_to_the_bound_is_decided_by_what_it_wraps() -> None:
    """Up to ``MAX_WRAPPERS`` in a row (each wrapper, mixed): a catalogued, sidecar-set or claim
    name behind them is removed at any depth, an ordinary one kept (grpc-gateway's own use)."""
    for f in _filters():
        for depth in range(1, MAX_WRAPPERS + 1):
            for first in WRAPPERS:
                run = [first, *(WRAPPERS[i % len(WRAPPERS)] for i in range(depth - 1))]
                for inner in ("x-forwarded-for", "x-forwarded-client-cert", CLAIM_HEADER,
                              "x-astro-path", "x-amzn-waf-bot"):
                    assert f.removes(_run(run, inner)), (run, inner)
                for inner in ("x-trace-me", "x-datadome-clientid", "accept"):
                    assert not f.removes(_run(run, inner)), (run, inner)


def test_more_wrappers_in_a_row_than_the_bound_are_removed_whatever_they_wrap() -> None:
    for f in _filters():
        for w in WRAPPERS:
            for inner in ("x-trace-me", "accept", "x-forwarded-for", ""):
                assert f.removes((w * (MAX_WRAPPERS + 1) + inner).encode()), (w, inner)
        mixed = [WRAPPERS[i % len(WRAPPERS)] for i in range(MAX_WRAPPERS + 1)]
        assert f.removes(_run(mixed, "x-trace-me"))


def _lines_run(call: Callable[[], Any]) -> int:
    """The number of lines ``call`` runs in sidecar/http/untrusted.py (a trace, not a timer)."""
    target = untrusted.__file__
    count = 0

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "line":
            count += 1
        return local

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename == target else None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        call()
    finally:
        sys.settrace(previous)
    return count


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_the_work_for_a_run_of_wrappers_does_not_grow_with_the_run(wrapper: str) -> None:
    """The lines run to decide a name behind 10,000 wrappers are those of a name behind
    ``MAX_WRAPPERS + 1`` (before: a loop turn, a copy and three hashes of the rest per wrapper)."""
    f = HeaderFilter(allow_underscores=True)
    f.set_claim_headers([CLAIM_HEADER])

    def lines(n: int) -> int:
        name = (wrapper * n + "x-custom").encode()  # longer than KEPT_NAME_BYTES: not kept
        return _lines_run(lambda: f.removes(name))

    short, long_ = lines(MAX_WRAPPERS + 1), lines(10_000)
    assert 0 < short and long_ <= short, (short, long_)
    # the wrapped name costs no more lines than a plain name of the same length, plus the
    # wrappers looked at
    plain = _lines_run(lambda: f.removes(b"x-" + b"a" * (len(wrapper) * 10_000)))
    assert long_ <= plain + 12 * (MAX_WRAPPERS + 1), (long_, plain)


def _best_of(call: Callable[[], Any], rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_a_long_wrapped_name_costs_about_what_a_plain_one_does(wrapper: str) -> None:
    """A 64 KiB name of wrappers against a 64 KiB plain name, in the same process: a generous
    ratio (before: about a thousand times; 40 ms at 32 KiB and seconds at 256 KiB)."""
    f = HeaderFilter(allow_underscores=True)
    size = 64 * 1024
    wrapped = (wrapper * (size // len(wrapper)) + "x").encode()
    plain = b"x-" + b"a" * (len(wrapped) - 2)
    assert f.removes(wrapped) and not f.removes(plain)
    ratio = _best_of(lambda: f.removes(wrapped)) / _best_of(lambda: f.removes(plain))
    assert ratio < 20, ratio


@pytest.mark.parametrize("side", SIDES)
def test_long_runs_of_wrappers_through_the_sidecars(mesh: Mesh, side: str) -> None:
    """Through real sidecars on both listeners: up to ``MAX_WRAPPERS`` wrappers an ordinary
    name reaches the app and a catalogued one does not; one more, or a run filling most of the
    head (6 KiB of ``Http-``), and nothing of it reaches the app -- the request is served."""
    ok_run = "".join(w.title() for w in (WRAPPERS * MAX_WRAPPERS)[:MAX_WRAPPERS])
    too_many = "Http-" * (MAX_WRAPPERS + 1)
    lines = [f"{ok_run}X-Trace-Me: {MARK}\r\n".encode(),
             f"{ok_run}X-Forwarded-For: {MARK}\r\n".encode(),
             f"{ok_run}X-Astro-Path: {MARK}\r\n".encode(),
             f"{too_many}X-Trace-Me: {MARK}\r\n".encode(),
             f"{'Grpc-Metadata-' * (MAX_WRAPPERS + 1)}X: {MARK}\r\n".encode(),
             f"{'Http-' * 1200}X: {MARK}\r\n".encode()]
    heads = _send_lines(mesh, side, lines)
    assert _leaks(heads) == [(f"{ok_run}X-Trace-Me".lower(), MARK)]
