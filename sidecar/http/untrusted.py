"""The catalogue of request headers an app would believe, removed before any app sees them.

Theory of operation: apps behind a proxy trust headers that "the proxy" sets -- the client's
address, the original URL or method, the caller's identity or certificate. A caller who sends
them itself would be believed. So every request, inbound and outbound, loses every header in
``CATALOGUE`` before it is forwarded; the sidecar then adds the few it sets from what it
verified (``x-forwarded-client-cert``, ``x-request-id``, ``x-forwarded-proto`` and the
policy's claim headers).

Names are compared after folding case and treating ``_`` as ``-``: CGI, WSGI, PHP and many
frameworks turn both ``X-Forwarded-For`` and ``X_Forwarded_For`` into ``HTTP_X_FORWARDED_FOR``.
Header names that contain ``_`` at all are dropped by default, as nginx does
(``headers.allow_underscores`` keeps them, still filtered by the catalogue). Names with any
other character outside letters, digits and ``-`` (``.``, ``~``, ``!``... which RFC 9110
allows in a token) are always dropped, as nginx's ``ignore_invalid_headers`` does: lighttpd
and other CGI/FastCGI gateways map every such character to ``_``, so ``X.Forwarded.For``
would reach the app as ``HTTP_X_FORWARDED_FOR``. A name that is a catalogue entry (or a
header the sidecar sets) behind a wrapper (``WRAPPERS``: CGI's ``HTTP_``, grpc-gateway's
``Grpc-Metadata-``) -- ``HTTP_X_FORWARDED_FOR``, ``Http-X-Real-Ip``, ``Grpc-Metadata-X-User`` --
is removed too: it is the entry to what reads past the wrapper, and Java's "real
IP" helpers read ``request.getHeader("HTTP_X_FORWARDED_FOR")`` literally (it reaches the app
only with ``headers.allow_underscores``; found by a hostile review). A name with more than
``MAX_WRAPPERS`` wrappers in a row is removed whatever it wraps (deciding each inner name of a
longer run was quadratic in the name's length). So is a ``_`` spelling
of Content-Length or Content-Type (``Content_Length``): CGI gives those two fields variables
of their own, and a server that reads ``_`` as ``-`` let the copy overwrite the real one.

An entry is an exact name or a prefix (``prefix=True``: every name that starts with it, but
the client credentials in ``NOT_IN_PREFIX``: ``X-Auth-Token`` and ``X-Auth-Key``). An
operator may pass one name through (``headers.pass_through``); the headers the sidecar sets
itself (``SIDECAR_SET``) can never be passed through. docs/SECURITY.md reproduces this table
(``tests/test_header_catalogue.py`` checks that it does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Set
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Entry:
    """One catalogue entry: a header name (or name prefix), its family and why it is here."""

    name: str
    family: str
    reason: str
    prefix: bool = False


def _family(family: str, reason: str, names: str, *, prefix: bool = False) -> list[Entry]:
    return [Entry(n, family, reason, prefix) for n in names.split()]


FORWARDING = "forwarding"
OVERRIDE = "request-override"
IDENTITY = "identity"
CLIENT_CERT = "client-certificate"
CGI = "cgi"

CATALOGUE: tuple[Entry, ...] = tuple(
    _family(FORWARDING, "RFC 7239 forwarding record: client address, host and scheme the app "
            "believes came from a trusted proxy", "forwarded")
    + _family(FORWARDING, "the whole X-Forwarded-* family (For, Host, Proto, Port, Server, "
              "Scheme, Ssl, Prefix, Path, Uri, User, Email, Groups, Access-Token, "
              "Tls-Client-Cert, ...): set by proxies, believed by frameworks",
              "x-forwarded", prefix=True)
    + _family(FORWARDING, "client-address headers of load balancers and CDNs (nginx, "
              "Akamai, Cloudflare, Fastly, GCP, Azure, AWS, F5, Rackspace); apps use them "
              "for allowlists, rate limits and logs",
              "x-real-ip x-client-ip client-ip true-client-ip cf-connecting-ip "
              "cf-connecting-ipv6 fastly-client-ip x-cluster-client-ip x-originating-ip "
              "x-remote-ip x-remote-addr remote-addr x-proxyuser-ip x-azure-clientip "
              "x-azure-socketip x-appengine-user-ip x-original-forwarded-for x-client-port "
              "x-real-port x-host x-original-host x-http-host-override x-forwarded-host-override "
              "cf-pseudo-ipv4 x-nf-client-connection-ip x-vercel-forwarded-for "
              "incap-client-ip x-sucuri-clientip fly-client-ip do-connecting-ip "
              "x-true-ip real-ip x-original-remote-addr x-custom-ip-authorization "
              "x-client-addr forwarded-for forwarded-for-ip x-forwarder-for x-forward-for "
              "x-forwared-for x-coming-from")
    + _family(FORWARDING, "the client address of Java's 'real IP' helpers (Proxy-Client-IP, "
              "next to X-Forwarded-For and X-Real-IP in most of them): rate limits, "
              "allowlists and logs", "proxy-client-ip")
    + _family(FORWARDING, "the proxy chain (RFC 9110 7.6.3): a caller's copy names proxies "
              "the request never passed, and apps that look for their gateway in it (or log "
              "it as the route) would believe them", "via")
    + _family(FORWARDING, "scheme headers: the app believes the client used HTTPS (secure "
              "cookies, redirects, HSTS and 'https only' checks); IIS/ARR, CloudFront, "
              "Rack, ingress-nginx, App Engine and Cloudflare names",
              "front-end-https x-arr-ssl cloudfront-forwarded-proto x-url-scheme x-scheme "
              "x-appengine-https cf-visitor")
    + _family(FORWARDING, "more scheme headers: Fastly's Fastly-SSL, Azure App Service's "
              "X-AppService-Proto, Magento's SSL offloader header (SSL_OFFLOADED, read as "
              "HTTP_SSL_OFFLOADED); found by a hostile review",
              "fastly-ssl x-appservice-proto ssl-offloaded")
    + _family(FORWARDING, "Fly.io's scheme and port headers (Fly-Forwarded-Proto, -Port, "
              "-Ssl; found by a hostile review)", "fly-forwarded-", prefix=True)
    + _family(FORWARDING, "Alibaba Cloud CDN's client address (found by a hostile review)",
              "ali-cdn-real-ip")
    + _family(FORWARDING, "Jetty's ForwardedRequestCustomizer (Spring Boot on Jetty with "
              "forwarded headers on): X-Proxied-Https makes the request secure, Proxy-ssl-id "
              "and Proxy-auth-cert become its TLS session id and cipher suite (found by a hostile "
              "review)", "x-proxied-https proxy-ssl-id proxy-auth-cert")
    + _family(FORWARDING, "which edge the request came through: apps behind Azure Front Door "
              "accept only their own X-Azure-FDID, apps behind Fastly trust Fastly-FF as "
              "'came through our CDN' (found by a hostile review)", "x-azure-fdid fastly-ff")
    + _family(FORWARDING, "what a CDN derived from the client's connection: its address, "
              "country, city, TLS and client certificate (CloudFront's whole family: "
              "CloudFront-Viewer-Address, -Country, -TLS, -Cert-Subject, -Cert-Issuer, "
              "CloudFront-Is-*-Viewer, ...; Vercel's whole x-vercel-* family: x-vercel-ip-*, "
              "x-vercel-proxy-signature, ...; Netlify x-nf-*; Akamai "
              "X-Akamai-Edgescape; the Google load balancer's X-Client-Geo-Location / -Region "
              "/ -City): apps geofence, rate-limit, log and authenticate by them (found by a "
              "hostile review)",
              "cloudfront- x-vercel- x-nf- x-akamai-edgescape x-client-geo- "
              "x-client-region x-client-city", prefix=True)
    + _family(FORWARDING, "Cloudflare's whole family: what its edge tells the origin under "
              "cf-* -- the client certificate's verification (cf-cert-verified, "
              "cf-cert-presented, cf-cert-subject-dn, ...: the 'TLS client auth' managed "
              "transform), bot scores (cf-bot-score, cf-verified-bot, cf-threat-score, "
              "cf-ja3-hash), the visitor's location (cf-ipcountry, cf-region, cf-timezone, "
              "...), cf-worker, cf-ray; beside the cf- names above (found by a hostile "
              "review: cf-cert-* and the rest were forwarded)", "cf-", prefix=True)
    + _family(FORWARDING, "Akamai's whole family of edge-to-origin headers (Akamai-User-Risk: "
              "Account Protector's risk score, which apps step up or let through by; "
              "Akamai-Origin-Hop, ...; found by a hostile review)", "akamai-", prefix=True)
    + _family(FORWARDING, "Cloudflare's leaked-credentials managed transform: the app "
              "takes the request's password for a leaked one (found by a hostile review)",
              "exposed-credential-check")
    + _family(FORWARDING, "the whole x-original-* family: ASP.NET Core's forwarded-headers "
              "middleware keeps the values it replaced in X-Original-For, -Proto, -Host and "
              "-Prefix (apps log and trust them as the client's), and proxies record the "
              "request before a rewrite in the others (the URL, path and method entries "
              "above); found by a hostile review", "x-original-", prefix=True)
    + _family(OVERRIDE, "rewrite the path after routing (IIS, Symfony, Laravel, Zend, "
              "Drupal, Spring): an allowed GET /public would reach /admin",
              "x-original-url x-rewrite-url x-original-uri x-original-path x-request-uri "
              "x-envoy-original-path x-envoy-original-url x-script-name script-name "
              "x-override-url x-proxy-url x-http-destinationurl x-ms-original-url "
              "x-original-request-uri x-rewrite-path x-path-info")
    + _family(OVERRIDE, "Azure App Service's URL as the client sent it, before decoding: "
              "apps and IIS modules read the path from it (found by a hostile review)",
              "x-waws-unencoded-url")
    + _family(OVERRIDE, "rewrite the method after routing (Rails, Express method-override, "
              "Spring HiddenHttpMethodFilter, Google APIs, Laravel): a GET allowed by the "
              "policy would run as DELETE",
              "x-http-method-override x-http-method x-method-override x-original-method "
              "x-envoy-original-method")
    + _family(IDENTITY, "Envoy's internal headers (peer metadata, original destination, "
              "retry and routing controls); Envoy itself strips them from external requests",
              "x-envoy-", prefix=True)
    + _family(IDENTITY, "Linkerd's headers (l5d-client-id carries the caller's identity; "
              "l5d-dst-override reroutes)", "l5d-", prefix=True)
    + _family(IDENTITY, "Istio and Pomerium identity and attribute headers",
              "x-istio- x-pomerium-", prefix=True)
    + _family(IDENTITY, "SPIFFE and peer identity under their common names",
              "x-spiffe-id x-spiffe x-client-spiffe-id x-peer-id x-peer-identity "
              "x-peer-spiffe-id x-sidecar-peer x-forwarded-client-identity x-client-identity "
              "x-source-identity x-workload-identity x-service-identity x-caller-identity")
    + _family(IDENTITY, "authenticated-subject headers that gateways and auth proxies set "
              "(Apache/CGI REMOTE_USER, Kong, Tyk, oauth2-proxy, Traefik forward-auth)",
              "remote-user x-remote-user x-user x-user-id x-userid x-username x-user-name "
              "x-user-email x-email x-auth-user x-auth-subject x-auth-email x-auth-groups "
              "x-authenticated-user x-authenticated-userid x-authenticated-scope "
              "x-authenticated-groups x-subject x-principal x-identity x-groups x-roles "
              "x-scopes x-client-id x-credential-identifier x-credential-username "
              "x-anonymous-consumer x-api-user x-token-subject x-access-token x-id-token "
              "x-userinfo x-user-info x-authorization x-auth-token-subject "
              "x-remote-group gap-auth x-auth-username x-auth-userid x-proxy-user "
              "x-proxy-remote-user spiffe-id")
    + _family(IDENTITY, "the whole x-auth- family of auth gateways and middleware "
              "(X-Auth-Roles, -Role, -User-Id, -Tenant, -Scopes, -Claims, -Org, ...), "
              "but for the two credentials clients send themselves, X-Auth-Token and "
              "X-Auth-Key (OpenStack, Swift), which apps verify (NOT_IN_PREFIX)",
              "x-auth-", prefix=True)
    + _family(IDENTITY, "the whole x-user- family of gateways and middleware that assert "
              "who the caller is (X-User-Roles, -Groups, -Tenant, -Scopes, -Permissions, "
              "-Claims, -Org, -Sub, ...; found by a hostile review: only the exact names "
              "above were removed), but for X-User-Agent, a client's own description that "
              "some SDKs send (NOT_IN_PREFIX)",
              "x-user-", prefix=True)
    + _family(IDENTITY, "OpenStack keystonemiddleware's identity of the token it validated "
              "(the service reads the caller's user, project, domain, roles and admin "
              "flag from these), and role and admin flags under their common names",
              "x-identity-status x-service-identity-status x-domain-id x-domain-name "
              "x-project-id x-project-name x-project-domain-id x-project-domain-name "
              "x-user-domain-id x-user-domain-name x-tenant x-tenant-id x-tenant-name "
              "x-role x-service-roles x-service-catalog x-is-admin-project x-is-admin "
              "x-admin x-service-user-id x-service-user-name x-service-user-domain-id "
              "x-service-user-domain-name x-service-project-id x-service-project-name "
              "x-service-project-domain-id x-service-project-domain-name x-trust-id")
    + _family(IDENTITY, "Kubernetes impersonation (Impersonate-User, -Group, -Uid, "
              "-Extra-*): an app that calls the API server with its own credentials would "
              "act as whoever the caller names", "impersonate-", prefix=True)
    + _family(IDENTITY, "Elasticsearch's run-as header: an app that passes it on to the "
              "cluster with its own credentials would act as whoever the caller names "
              "(found by a hostile review)", "es-security-runas-user")
    + _family(IDENTITY, "run-as headers of other APIs: GitLab's and Gitea's Sudo, Redmine's "
              "X-Redmine-Switch-User, Discourse's Api-Username, Zendesk's X-On-Behalf-Of, "
              "OpenSearch's opendistro_security_impersonate_as -- an app that passes them on "
              "with its own admin credential would act as whoever the caller names (found by "
              "a hostile review; put the name in headers.pass_through when the app behind "
              "the sidecar is itself such an API and its clients send it)",
              "sudo x-redmine-switch-user api-username x-on-behalf-of "
              "opendistro-security-impersonate-as")
    + _family(IDENTITY, "grpc-gateway's own metadata namespace: its default matcher passes "
              "Authorization and Cookie to the gRPC server as grpcgateway-authorization and "
              "grpcgateway-cookie, and a caller's Grpc-Metadata-Grpcgateway-Authorization "
              "becomes the same key -- a second, unverified token beside the verified one "
              "(found by a hostile review); no client sends these names", "grpcgateway-",
              prefix=True)
    + _family(IDENTITY, "the user, groups and caller facts platforms and identity-aware "
              "proxies assert to the apps they front (found by a hostile review): Google "
              "Cloud Endpoints' x-endpoint-api-* (the API consumer; its userinfo), AWS "
              "Verified Access's x-amzn-ava-user-context, Kubeflow's kubeflow-userid and "
              "-groups, Snowflake Container Services' sf-context-current-user, ShinyProxy's "
              "x-sp-userid and -usergroups, caddy-security's x-token-user-*, Warpgate's "
              "x-warpgate-*", "x-endpoint-api- x-amzn-ava- kubeflow- sf-context- x-sp- "
              "x-token-user- x-warpgate-", prefix=True)
    + _family(IDENTITY, "the signed-in user as Posit Connect, Shiny Server (py-shiny's "
              "session.user and .groups) and Domino Data Lab hand it to apps (found by a "
              "hostile review)", "rstudio-connect-credentials shiny-server-credentials "
              "domino-username")
    + _family(IDENTITY, "Hasura session variables (x-hasura-role, x-hasura-user-id, ...): "
              "Hasura takes them as the caller's role and identity, and apps behind other "
              "gateways copy the convention", "x-hasura-", prefix=True)
    + _family(IDENTITY, "per-gateway identity families: oauth2-proxy x-auth-request-*, Kong "
              "x-consumer-*, WSO2/APISIX/Ambassador JWT claim headers",
              "x-auth-request- x-consumer- x-jwt- x-claim- x-token-claim-", prefix=True)
    + _family(IDENTITY, "auth-proxy families: Authelia/Traefik Remote-User/-Groups/-Email/"
              "-Name, authentik x-authentik-*, Vouch x-vouch-*, Grafana auth proxy "
              "x-webauth-*, Kubernetes front-proxy x-remote-extra-*, Shibboleth shib-*, "
              "Apache mod_auth_openidc OIDC_CLAIM_* / OIDC_access_token (folded: oidc-*)",
              "remote- x-authentik- x-vouch- x-webauth- x-remote-extra- shib- oidc-",
              prefix=True)
    + _family(IDENTITY, "the whole x-proxy- and x-remote- families, under names not listed "
              "above: OpenSearch's and Search Guard's proxy authentication (x-proxy-user, "
              "x-proxy-roles, x-proxy-ext-* attributes), the Kubernetes front-proxy's "
              "X-Remote-User / -Group and the variants apps read next to them "
              "(X-Remote-User-Group, -Email, -Groups; found by a hostile review)",
              "x-proxy- x-remote-", prefix=True)
    + _family(IDENTITY, "Kong's whole identity families, under names not listed above "
              "(X-Authenticated-*, X-Credential-*, X-Anonymous-*); found by a hostile review",
              "x-authenticated- x-credential- x-anonymous-", prefix=True)
    + _family(IDENTITY, "web access management agents in front of enterprise apps: "
              "SiteMinder SM_USER, SM_USERDN, SM_UNIVERSALID, ... (Spring Security's "
              "RequestHeaderAuthenticationFilter reads SM_USER by default), IBM WebSEAL "
              "iv-user, iv-groups, iv-creds, iv-remote-address, Oracle Access Manager "
              "OAM_REMOTE_USER, OAM_*, Apache mod_auth_cas CAS-User and CAS_* attributes "
              "(found by a hostile review)", "sm- iv- oam- cas-", prefix=True)
    + _family(IDENTITY, "SiteMinder's names without the separator (SMUSER, SMUSERDN, ...)",
              "smuser smuserdn smuniversalid smauthtype smrealm smserversessionid "
              "smserversessionspec smtransactionid smsession smauthreason")
    + _family(IDENTITY, "SAML attributes as headers, under the ids of Shibboleth's default "
              "attribute map (ShibUseHeaders On): the app takes them as the signed-in user's "
              "(found by a hostile review)",
              "eppn affiliation unscoped-affiliation entitlement persistent-id targeted-id "
              "pairwise-id subject-id")
    + _family(IDENTITY, "mod_auth_mellon's SAML attributes and name id (MELLON_NAME_ID, "
              "MELLON_*; found by a hostile review)", "mellon-",
              prefix=True)
    + _family(IDENTITY, "the caller's identity as other meshes and runtimes assert it: Dapr's "
              "dapr-caller-app-id, -namespace and dapr-callee-app-id (apps authorise callers "
              "by them), Kuma's x-kuma-tags (the source's tags); identity-aware tunnels: "
              "Tailscale Serve Tailscale-User-Login / -Name / -Profile-Pic, ngrok's "
              "ngrok-auth-user-*, Teleport's Teleport-Jwt-Assertion (found by a hostile review)",
              "dapr-caller- dapr-callee- x-kuma- tailscale- ngrok-auth- teleport-jwt-",
              prefix=True)
    + _family(IDENTITY, "AWS Lambda Web Adapter hands the app the API Gateway request "
              "context (the authorizer's claims) and the Lambda context in these; API "
              "Gateway private APIs name the VPC endpoint the request came through (found by a "
              "hostile review)",
              "x-amzn-request-context x-amzn-lambda-context x-amzn-vpce-id "
              "x-amzn-vpce-config x-amzn-apigateway-api-id")
    + _family(IDENTITY, "AWS VPC Lattice's caller identity headers (x-amzn-lattice-identity: "
              "the SigV4 principal, its organisation, Roles Anywhere certificate names; "
              "-network, -target): Lattice strips them from incoming requests, so apps "
              "authorise by them (found by a hostile review)", "x-amzn-lattice-",
              prefix=True)
    + _family(IDENTITY, "serverless adapters (aws-serverless-express, serverless-http) read "
              "the API Gateway event and its authorizer claims from these",
              "x-apigateway-event x-apigateway-context")
    + _family(IDENTITY, "cloud identity-aware proxies (Google IAP and Cloud Endpoints, "
              "AWS ALB OIDC, Azure App Service EasyAuth, Cloudflare Access)",
              "x-goog-authenticated-user-email x-goog-authenticated-user-id "
              "x-goog-iap-jwt-assertion x-apigateway-api-userinfo "
              "x-amzn-oidc-data x-amzn-oidc-identity x-amzn-oidc-accesstoken "
              "x-ms-client-principal x-ms-client-principal-id x-ms-client-principal-name "
              "x-ms-client-principal-idp cf-access-jwt-assertion "
              "cf-access-authenticated-user-email")
    + _family(IDENTITY, "Azure EasyAuth token headers", "x-ms-token-", prefix=True)
    + _family(IDENTITY, "the whole families of the identity-aware proxies above, under names "
              "not listed (AWS ALB x-amzn-oidc-*, Azure x-ms-client-principal*, Google "
              "x-goog-authenticated-* and x-goog-iap-*, Cloudflare Access cf-access-*, its "
              "service-token ids too), and SPIFFE IDs under any name that starts with one "
              "(x-spiffe-ids, spiffeid)",
              "x-amzn-oidc- x-ms-client-principal x-goog-authenticated- x-goog-iap- "
              "cf-access- x-spiffe spiffe", prefix=True)
    + _family(IDENTITY, "facts Google's platforms set and strip from outside requests, so "
              "handlers trust them to authorise: App Engine's users API, cron, task queue "
              "and calling-app headers (X-AppEngine-User-Email, -User-Is-Admin, -Cron, "
              "-QueueName, -Inbound-Appid, ...), Cloud Tasks and Cloud Scheduler",
              "x-appengine- x-cloudtasks- x-cloudscheduler", prefix=True)
    + _family(CLIENT_CERT, "RFC 9440 client certificate and chain, as proxies forward them",
              "client-cert client-cert-chain")
    + _family(CLIENT_CERT, "client-certificate and client-DN families of nginx, Apache "
              "mod_ssl, HAProxy, F5, AWS ALB mTLS, Azure ARR, Traefik and Cloudflare: the app "
              "would take them as a verified certificate",
              "ssl-client- x-ssl- x-client-cert x-client-certificate x-client-verify "
              "x-client-dn x-client-s-dn x-client-i-dn x-client-subject x-client-issuer "
              "x-client-serial x-client-fingerprint x-tls-client- x-amzn-mtls-clientcert "
              "x-arr-clientcert cf-client-cert- x-mtls- ssl-cipher ssl-protocol ssl-session-id",
              prefix=True)
    + _family(CLIENT_CERT, "HAProxy's X-SSL flag (the connection used TLS)", "x-ssl")
    + _family(CLIENT_CERT, "WebLogic's proxy plug-in headers (WL-Proxy-Client-Cert, "
              "WL-Proxy-SSL, WL-Proxy-Client-IP, WL-Proxy-Client-Keysize): WebLogic takes "
              "them as the client's certificate, scheme and address", "wl-proxy-",
              prefix=True)
    + _family(CLIENT_CERT, "the TLS version and cipher AWS ALB reports to the app "
              "(X-Amzn-Tls-Version, X-Amzn-Tls-Cipher-Suite), like SSL_PROTOCOL and "
              "SSL_CIPHER above (found by a hostile review)", "x-amzn-tls-", prefix=True)
    + _family(CLIENT_CERT, "the client's certificate chain as Keycloak's reverse-proxy "
              "certificate lookup reads it (SSL_CLIENT_CERT above, then CERT_CHAIN_0, "
              "CERT_CHAIN_1, ...): Keycloak would log the caller in by that certificate "
              "(found by a hostile review)", "cert-chain-", prefix=True)
    + _family(OVERRIDE, "Next.js internal routing headers: x-middleware-subrequest makes "
              "Next.js skip its middleware, so authorisation done there is bypassed "
              "(CVE-2025-29927); x-middleware-invoke, x-invoke-path, -query, -output, "
              "-status, x-matched-path and x-now-route-matches reroute or rewrite the "
              "request inside the server (found by a hostile review)",
              "x-middleware- x-invoke-", prefix=True)
    + _family(OVERRIDE, "more Next.js internal routing headers (above)",
              "x-matched-path x-now-route-matches")
    + _family(OVERRIDE, "Rack::Sendfile's front-proxy settings, read from the request: "
              "X-Sendfile-Type and X-Accel-Mapping make a Rails app answer with an "
              "X-Accel-Redirect into an internal location (CVE-2025-61780); the whole "
              "x-accel- family is nginx's, never a client's (found by a hostile review)",
              "x-sendfile-type x-accel-", prefix=True)
    + _family(OVERRIDE, "Apache Camel's message headers (CamelHttpUri, CamelHttpPath, "
              "CamelHttpMethod rewrite where and how a route calls on; CamelExec* run "
              "commands, CVE-2025-27636): Camel copies request headers into the message, "
              "and its own filter of these names was bypassed by case (found by a hostile "
              "review)", "camel", prefix=True)
    + _family(IDENTITY, "the tenant of multi-tenant backends: Loki, Mimir, Cortex, Tempo and "
              "Pyroscope take X-Scope-OrgID, Thanos Receive THANOS-TENANT, as the tenant an "
              "auth proxy in front has set (found by a hostile review)",
              "x-scope-orgid thanos-tenant")
    + _family(CLIENT_CERT, "ASP.NET Core's IIS integration: MS-ASPNETCORE-CLIENTCERT is the "
              "client certificate the IIS module forwards, next to its pairing token and "
              "the other MS-ASPNETCORE-* values (found by a hostile review)",
              "ms-aspnetcore-", prefix=True)
    + _family(IDENTITY, "the VPC an AWS API Gateway private API request came from, next to "
              "x-amzn-vpce-id above (found by a hostile review)", "x-amzn-vpc-id")
    # The twenty-seventh session's review: framework adapters' internal headers, more edges'
    # client addresses and the verdicts WAFs and bot managers insert for the app.
    + _family(OVERRIDE, "Astro's adapter-internal headers: @astrojs/vercel's serverless entry "
              "ran the path in x-astro-path (CVE-2026-33768, GHSA-mr6q-rp88-fx84: GET "
              "/public/x with x-astro-path: /admin/delete ran /admin/delete, past a deny rule "
              "on /admin/**) and reads the request's locals from x-astro-locals, next to "
              "x-astro-middleware-secret (found by a hostile review)", "x-astro-", prefix=True)
    + _family(OVERRIDE, "OpenNext (@opennextjs/aws) skips Next.js middleware for a request "
              "with x-isr, its revalidation marker (the CVE-2025-29927 twin; the advisory's "
              "fix: strip x-isr from all external requests; found by a hostile review)", "x-isr")
    + _family(OVERRIDE, "OpenNext's internal headers (x-opennext-initial-url, -resolved-routes, "
              "-locale, -rewrite-status-code, ...) and the geolocation it hands Next.js "
              "middleware as request.geo and x-vercel-ip-* (x-open-next-city, -country, "
              "-region, -latitude, -longitude): middleware geofences by them (found by a "
              "hostile review)", "x-opennext- x-open-next-", prefix=True)
    + _family(OVERRIDE, "vinext's (Cloudflare's Vite Next.js) internal headers: "
              "x-vinext-mw-ctx carried the middleware's result, so a caller's {} skipped "
              "middleware and a rewrite URL in it made the server an SSRF proxy (vinext "
              "#1943); x-vinext-internal-authorization, -internal-request-cf, "
              "-prerender-secret, ... (found by a hostile review)", "x-vinext-", prefix=True)
    + _family(OVERRIDE, "the rest of Next.js's INTERNAL_HEADERS, which Next.js, OpenNext and "
              "vinext strip from every incoming request (x-nextjs-data marks a data request, "
              "x-next-resume-state-length a resumed render; beside x-middleware-*, "
              "x-matched-path and x-now-route-matches above)",
              "x-nextjs-data x-next-resume-state-length")
    + _family(OVERRIDE, "Traefik's ReplacePath and ReplacePathRegex keep the original path in "
              "X-Replaced-Path: apps route and build links by it (found by a hostile review)",
              "x-replaced-path")
    + _family(FORWARDING, "client-address headers of more edges: Tencent EdgeOne's "
              "EO-Connecting-IP (its default) and EO-Client-IP (its documented custom name), "
              "Alibaba ESA's ali-real-client-ip, Alibaba CDN's Ali-Cdn-Real-Port, "
              "CDNetworks' Cdn-Src-Ip (its default): the same class as cf-connecting-ip and "
              "ali-cdn-real-ip above (found by a hostile review)",
              "eo-connecting-ip eo-client-ip ali-real-client-ip ali-cdn-real-port cdn-src-ip")
    + _family(FORWARDING, "what more edges derived from the client's connection: Alibaba ESA's "
              "ali-ip-country and ali-ip-city and its TLS fingerprints Tls-Ja3, Tls-Ja4 and "
              "Tls-Hash (bot detection), Transparent Edge's Geo_Country_Code, Alibaba CDN's "
              "X-Client-Scheme (the client's scheme): apps geofence, detect bots and trust "
              "HTTPS by them (found by a hostile review)",
              "ali-ip-country ali-ip-city tls-ja3 tls-ja4 tls-hash geo-country-code "
              "x-client-scheme")
    + _family(FORWARDING, "Tencent EdgeOne's bot-management verdict (EO-Bot-Tag: bot type, "
              "name, botnet id, JA3, the action applied): the origin rate-limits and blocks by "
              "it (found by a hostile review)", "eo-bot-tag")
    + _family(FORWARDING, "verdicts WAFs and bot managers insert for the app: AWS WAF's custom "
              "request headers (always x-amzn-waf-*; AWS tells users to block callers' "
              "copies), Fastly Next-Gen WAF's (Signal Sciences) X-SigSci-AgentResponse "
              "(allow or block) and X-SigSci-Tags (its signals), DataDome's X-DataDome-IsBot, "
              "-BotName, -CaptchaPassed, -RuleType, ... but for X-DataDome-ClientID, the "
              "client's own session id the DataDome module verifies (NOT_IN_PREFIX): apps let "
              "through, step up or block by them (found by a hostile review)",
              "x-amzn-waf- x-sigsci- x-datadome-", prefix=True)
    + _family(IDENTITY, "RSA ClearTrust's signed-in user (ct-remote-user, ctemail): JBoss's "
              "GenericHeaderAuthenticator and Spring's RequestHeaderAuthenticationFilter log "
              "users in by them, as by SM_USER above (found by a hostile review)", "ct-remote-user ctemail")
    + _family(IDENTITY, "Oracle Oblix's user attributes (Oblix-Uid, HTTP_OBLIX_UID to CGI; "
              "found by a hostile review)", "oblix-", prefix=True)
    + _family(CLIENT_CERT, "F5's X509::cert_fields header names and Zeus / Stingray / Ivanti "
              "vTM's SSL headers, written without separators (SSLClientCert, "
              "SSLClientCertStatus, SSLClientCertHash, -Issuer, -Subject, -SerialNumber, "
              "SSLClientCipher, SSLSessionID): apps take them as a verified certificate and "
              "a secure connection (found by a hostile review)", "sslclient", prefix=True)
    + _family(CLIENT_CERT, "the TLS session id under F5's and vTM's name (found by a hostile "
              "review)", "sslsessionid")
    + _family(IDENTITY, "the Windows identity IIS hands the process behind it: "
              "HttpPlatformHandler's X-IIS-WindowsAuthToken (a token handle middlewares turn "
              "into DOMAIN\\user), iisnode's x-iisnode-AUTH_USER, -LOGON_USER and other "
              "server variables (the twin of ms-aspnetcore-winauthtoken; found by a hostile "
              "review)", "x-iis-windowsauthtoken")
    + _family(IDENTITY, "iisnode's server variables (x-iisnode-AUTH_USER, -LOGON_USER, ...; "
              "found by a hostile review)", "x-iisnode-", prefix=True)
    + _family(IDENTITY, "run-as headers of Microsoft servers: Dataverse / Dynamics 365's "
              "MSCRMCallerID and CallerObjectId, Azure DevOps Server's X-TFS-Impersonate and "
              "X-TFS-SubjectDescriptorImpersonate -- an integration that passes them on with "
              "its own privileged account acts as whoever the caller names (found by a "
              "hostile review)", "mscrmcallerid callerobjectid x-tfs-impersonate "
              "x-tfs-subjectdescriptorimpersonate")
    + _family(FORWARDING, "GlassFish / Payara's and iPlanet's proxy headers "
              "(auth-pass-through): Proxy-ip becomes the client's address, Proxy-keysize "
              "and Proxy-secret-keysize make the request secure, Proxy-cipher, "
              "Proxy-issuer-dn and Proxy-user-dn are the client certificate's, Proxy-jroute "
              "picks the instance (the next variant of Jetty's Proxy-ssl-id above; found by "
              "a hostile review)", "proxy-ip proxy-keysize proxy-secret-keysize "
              "proxy-cipher proxy-issuer-dn proxy-user-dn proxy-jroute")
    + _family(OVERRIDE, "Cloud Foundry route services' headers: a route service proxies to "
              "whatever X-CF-Forwarded-Url names, under its own identity (SSRF), and trusts "
              "X-CF-Proxy-Signature, -Metadata and the app instance headers "
              "(X-CF-ApplicationID, -InstanceID, -InstanceIndex) as the router's; found by a "
              "hostile review", "x-cf-forwarded-url x-cf-proxy-signature x-cf-proxy-metadata "
              "x-cf-applicationid x-cf-instanceid x-cf-instanceindex")
    + _family(FORWARDING, "AD FS's request context as its Web Application Proxy sets it: "
              "X-MS-Forwarded-Client-IP (client-access and banned-IP policies allow or deny "
              "by it), X-MS-Proxy, X-MS-Endpoint-Absolute-Path, X-MS-Client-Application, "
              "X-MS-Client-User-Agent (found by a hostile review)",
              "x-ms-forwarded-client-ip x-ms-proxy x-ms-endpoint-absolute-path "
              "x-ms-client-application x-ms-client-user-agent")
    + _family(FORWARDING, "Tencent Cloud API Gateway's scheme headers (X-Client-Proto, "
              "X-Client-Proto-Ver, X-Api-Scheme): the same class as X-Client-Scheme above "
              "(found by a hostile review)", "x-client-proto x-client-proto-ver x-api-scheme")
    + _family(IDENTITY, "OpenStack keystonemiddleware's system scope and service-token domain "
              "(OpenStack-System-Scope: all is a token scoped to the whole deployment, which "
              "system_scope:all policies treat as its administrator; X-Service-Domain-Id, "
              "-Name): the rest of the family (X-Roles, X-Service-User-*) is above (found by "
              "a hostile review)", "openstack-system-scope x-service-domain-id "
              "x-service-domain-name")
    + _family(IDENTITY, "users that platforms assert to the app behind them: Azure SignalR's "
              "upstream X-ASRS-User-Id, -User-Claims, -Connection-Id (its signature covers the "
              "connection id only), Open WebUI's forwarded X-OpenWebUI-User-Id, -Email, -Role, "
              "Streamlit Cloud's X-Streamlit-User and -User-Email (found by a hostile review)",
              "x-asrs- x-openwebui- x-streamlit-user", prefix=True)
    + _family(IDENTITY, "the same, one name each: Azure Web PubSub's ce-userId (a CloudEvents "
              "attribute whose signature covers the connection id only; the other ce- "
              "attributes are not identity and pass), Mattermost's Mattermost-User-Id "
              "(plugins authorise by it), Amazon Bedrock AgentCore's WorkloadAccessToken and "
              "X-Amzn-Bedrock-AgentCore-Runtime-User-Id, Grafana's data-proxy X-Grafana-User "
              "(found by a hostile review)", "ce-userid mattermost-user-id workloadaccesstoken "
              "x-amzn-bedrock-agentcore-runtime-user-id x-grafana-user")
    + _family(IDENTITY, "run-as and act-as headers of widely used APIs: an app that passes the "
              "caller's headers on with its own privileged credential acts as whoever the "
              "caller names -- Stripe-Account and Stripe-Context (Connect), Box's As-User, "
              "Dropbox-API-Select-User and -Select-Admin, PayPal-Auth-Assertion (an unsigned "
              "JWT naming the merchant), PingIDM's X-OpenIDM-RunAs, Appwrite's "
              "X-Appwrite-Impersonate-User-Id, Apache Drill's User-Name (impersonation with "
              "its own authentication off), Trino's and Presto's X-Trino-User, "
              "X-Trino-Original-User and X-Presto-User (the user over plain HTTP). When the "
              "app is that API itself (Trino behind the sidecar), list the name in "
              "headers.pass_through (found by a hostile review)",
              "stripe-account stripe-context as-user dropbox-api-select-user "
              "dropbox-api-select-admin paypal-auth-assertion x-openidm-runas "
              "x-appwrite-impersonate-user-id user-name x-trino-user x-trino-original-user "
              "x-presto-user")
    + _family(IDENTITY, "Search Guard's impersonation and tenant headers (sg_impersonate_as "
              "read literally, the sibling of opendistro_security_impersonate_as above; "
              "sg_tenant; underscores fold to dashes; found by a hostile review)",
              "sg-impersonate-as sg-tenant")
    + _family(IDENTITY, "tenant selection: VictoriaMetrics, VictoriaLogs and VictoriaTraces "
              "take the tenant from AccountID and ProjectID (generic names, but their docs "
              "leave mapping users to tenants to the authorisation layer in front: here the "
              "sidecar), OpenSearch / Search Guard Dashboards' securitytenant and sgtenant, "
              "Grafana's X-Grafana-Org-Id -- the class of X-Scope-OrgID above (found by a "
              "hostile review). When that backend is the app, its own clients send them "
              "(OpenSearch Dashboards, Grafana API clients, log shippers): list them in "
              "headers.pass_through there, or the default tenant or organisation is used",
              "accountid projectid securitytenant sgtenant x-grafana-org-id")
    + _family(IDENTITY, "the signed-in user as NGINX Plus's OpenID Connect reference "
              "configuration passes it (proxy_set_header username $jwt_claim_sub), copied "
              "widely (found by a hostile review)", "username")
    + _family(IDENTITY, "mobile operators' header enrichment: the subscriber's phone number "
              "as gateways insert it (X-MSISDN, MSISDN, X-Up-Calling-Line-Id, X-Nokia-MSISDN, "
              "X-Up-Subno, X-H3G-MSISDN); apps log in and bill by it (found by a hostile "
              "review)", "x-msisdn msisdn x-up-calling-line-id x-nokia-msisdn x-up-subno "
              "x-h3g-msisdn")
    + _family(FORWARDING, "Https: on, which CGI and PHP turn into HTTP_HTTPS, the variable "
              "apps read as a TLS connection (the class of Front-End-Https above); "
              "appengine-user-ip, a client-address header elysia-ip reads (found by a hostile "
              "review)", "https appengine-user-ip")
    + _family(OVERRIDE, "Dapr's dapr-app-id: the Dapr sidecar routes the request to the app it "
              "names (the class of l5d-dst-override above; found by a hostile review)",
              "dapr-app-id")
    # The thirty-second session's review: trusted-proxy user and host headers of products
    # that read them by default.
    + _family(IDENTITY, "the signed-in user as products behind an authenticating proxy read "
              "it by default: Alfresco's X-Alfresco-Remote-User (external.authentication."
              "proxyHeader), Posit Workbench's X-RStudio-Username, LemonLDAP::NG's exported "
              "Auth-User and Auth-Mail (found by a hostile review)",
              "x-alfresco-remote-user x-rstudio-username auth-user auth-mail")
    + _family(IDENTITY, "Apache NiFi's, NiFi Registry's and DataWave's proxied-entity chain "
              "(X-ProxiedEntitiesChain, X-ProxiedEntityGroups, X-ProxiedIssuersChain): the "
              "request runs as the end user it names; Replit Auth's X-Replit-User-Id, -Name, "
              "-Roles, -Teams (found by a hostile review)",
              "x-proxiedentit x-proxiedissuer x-replit-user-", prefix=True)
    + _family(FORWARDING, "NiFi's forwarding headers, written without separators "
              "(X-ProxyScheme, X-ProxyHost, X-ProxyPort, X-ProxyContextPath: the scheme, host "
              "and path it builds URLs and redirects from), and Azure App Service's "
              "DISGUISED-HOST, which Kudu turns into the request's https URL (found by a "
              "hostile review)",
              "x-proxyscheme x-proxyhost x-proxyport x-proxycontextpath disguised-host")
    + _family("sidecar-set", "set by the sidecar itself on every request to the app (with "
              "x-forwarded-client-cert and x-forwarded-proto, covered above); the caller's "
              "copy would be a second, unverified value", "x-request-id")
    + _family(CGI, "httpoxy: CGI turns Proxy into HTTP_PROXY, which HTTP clients in the app "
              "use as their proxy", "proxy")
)

# Wrappers: a name prefix some gateway strips before the app (or the service behind it)
# reads the rest as a header of its own -- CGI's ``HTTP_`` (``HTTP_X_FORWARDED_FOR``, which
# Java's "real IP" helpers read literally), and grpc-gateway's ``Grpc-Metadata-`` (its
# default matcher passes ``Grpc-Metadata-X-User`` to the gRPC server as the metadata
# ``x-user``; found by a hostile review: every entry, the sidecar's own
# ``x-forwarded-client-cert`` included, reached the app so wrapped). A catalogue entry, a
# header the sidecar sets or a claim header behind any run of wrappers is removed, whatever
# ``pass_through`` says (docs/SECURITY.md).
WRAPPERS: tuple[str, ...] = ("http-", "grpc-metadata-")

# A name with more than this many wrappers in a row is removed whatever it wraps: no gateway
# stacks them that deep (CGI over grpc-gateway is two), and deciding every inner name of an
# unbounded run cost time quadratic in the name's length -- ``Http-Http-...-X`` filling
# ``limits.max_header_bytes`` stalled the event loop for every connection, 40 ms at 32 KiB and
# seconds at 256 KiB (found by a hostile review). Removing it keeps the rule that no wrapped
# catalogue name reaches the app.
MAX_WRAPPERS = 4

# Names a prefix entry covers that are not identity a gateway asserts but what the client
# itself sends -- credentials the app verifies, its own user agent, the session id its bot
# manager's script sends (X-DataDome-ClientID): forwarded like any other header.
NOT_IN_PREFIX: frozenset[str] = frozenset({"x-auth-token", "x-auth-key", "x-user-agent",
                                          "x-datadome-clientid"})

# Run-as query parameters (but those in ``headers.pass_through_parameters``): a request whose
# query holds one, under any name a common reader reads as it (``param_names``: percent-
# encoded, PHP's and Rack's spellings, any case), is refused 400 (``run_as_parameter``) on
# both listeners. They are the query twins of the run-as headers above: GitLab's and Gitea's
# API read ``sudo`` from the query as from the Sudo header; Hadoop's WebHDFS, HttpFS, Knox,
# YARN, Oozie, Livy and Solr read ``doas`` (any case) for their proxy users, and WebHDFS and
# YARN with simple authentication take ``user.name`` as the caller; Rundeck runs a job
# ``asUser``. An app that passes the caller's query on with its own privileged credential
# would act as whoever the caller names (found by a hostile review, thirty-second session:
# ``?sudo=root`` reached the app while the Sudo header was removed). Where the app behind
# the sidecar is itself such an API and its clients send the parameter, the operator lists
# its name in ``headers.pass_through_parameters``.
RUN_AS_PARAMETERS: tuple[str, ...] = ("sudo", "doas", "user.name", "asuser")

# Set by the sidecar itself from what it verified; never passed through from a caller.
SIDECAR_SET: frozenset[str] = frozenset({
    "x-forwarded-client-cert", "x-request-id", "x-forwarded-proto",
})


def fold(name: bytes | str) -> bytes:
    """The name as compared: lower case, ``_`` read as ``-``."""
    if isinstance(name, str):
        name = name.encode("latin-1")
    return name.lower().replace(b"_", b"-")


# Bytes a kept header name may hold, compared lower-cased ("_" is decided before it).
_NAME_BYTES = b"abcdefghijklmnopqrstuvwxyz0123456789-_"

_EXACT: frozenset[bytes] = frozenset(fold(e.name) for e in CATALOGUE if not e.prefix)
_PREFIXES: tuple[bytes, ...] = tuple(fold(e.name) for e in CATALOGUE if e.prefix)
_SIDECAR_SET: frozenset[bytes] = frozenset(fold(n) for n in SIDECAR_SET)
_NOT_IN_PREFIX: frozenset[bytes] = frozenset(fold(n) for n in NOT_IN_PREFIX)
_WRAPPERS: tuple[bytes, ...] = tuple(fold(w) for w in WRAPPERS)
# Credential headers the app may get as they are (it may verify a token itself), but never
# behind a wrapper: a caller's ``Grpc-Metadata-Authorization: Bearer forged`` became gRPC
# ``authorization`` metadata, and ``Http-X-Api-Key`` (``HTTP_X_API_KEY`` with underscores
# kept) a key the app read, while the sidecar verified only the plain spellings (found by a
# hostile review: an opaque token and an API key reached the app unchecked, beside a valid
# one too). With them, every token header a provider of the policy reads
# (``HeaderFilter.set_token_headers``).
CREDENTIAL_HEADERS: frozenset[str] = frozenset({"authorization", "proxy-authorization",
                                               "x-api-key"})
_CREDENTIALS: frozenset[bytes] = frozenset(fold(n.encode()) for n in CREDENTIAL_HEADERS)
# The longest name an exact lookup can match (claim headers are added per filter): a longer
# suffix behind a wrapper is never sliced off and hashed, so each wrapper costs the same
# whatever the length of the name.
_LONGEST_EXACT = max(len(n) for n in (*_EXACT, *_SIDECAR_SET, *_NOT_IN_PREFIX, *_CREDENTIALS))
# The fields CGI makes meta-variables without ``HTTP_`` (RFC 3875 4.1.2, 4.1.3).
_CGI_META = frozenset({b"content-length", b"content-type"})


def entry_for(name: bytes | str) -> Entry | None:
    """The catalogue entry that covers ``name`` (after folding), or None."""
    n = fold(name)
    for e in CATALOGUE:
        f = fold(e.name)
        if (e.prefix and n.startswith(f) and n not in _NOT_IN_PREFIX) or (
                not e.prefix and n == f):
            return e
    return None


def pass_through_problem(name: str) -> str | None:
    """Why ``name`` may not be listed in ``headers.pass_through`` (None: it may)."""
    if not name or any(c in name for c in " \t:\r\n"):
        return "expected a header name"
    if fold(name).decode("latin-1") in SIDECAR_SET:
        return f"{name!r} is set by the sidecar from what it verified; it cannot be passed through"
    if entry_for(name) is None:
        return f"{name!r} is not in the header catalogue (docs/SECURITY.md); it is forwarded already"
    return None


class HeaderFilter:
    """Decides, per header name, whether a caller's header reaches the app.

    ``drop`` holds the names that the caller's request never keeps (hop-by-hop and the
    sidecar's own headers, compared folded). Decisions are kept per raw name (names repeat
    on every request) in a bounded dictionary that computes a missing entry itself, so a
    request whose names were seen before is filtered without a Python call per field; the
    same holds for each set of extra names ``clean`` is given (one per policy version).
    Only names of at most ``KEPT_NAME_BYTES`` are kept: a name is as long as a head may be
    (``limits.max_header_bytes``, up to 8 MiB), and 4,096 kept names of 30 KiB each, one per
    request from any caller, grew a sidecar by 120 MiB (found by a hostile review).
    """

    __slots__ = ("_allow_underscores", "_pass", "_base", "_drop", "_claims", "_longest",
                 "_cache", "_extra", "_wrapped_only", "run_as")

    _CACHE_MAX = 4096
    _EXTRA_MAX = 16  # distinct (extra, exact) sets kept; they change with the policy only

    def __init__(self, *, allow_underscores: bool = False,
                 pass_through: Iterable[str] = (), drop: Iterable[bytes] = (),
                 run_as: Iterable[str] = RUN_AS_PARAMETERS) -> None:
        self._allow_underscores = allow_underscores
        # The run-as query parameters refused (``RUN_AS_PARAMETERS`` but those in
        # ``headers.pass_through_parameters``), lower-cased.
        self.run_as: frozenset[str] = frozenset(n.lower() for n in run_as)
        self._pass = frozenset(fold(n) for n in pass_through)
        from sidecar.http.headers import HOP_BY_HOP

        dropped: tuple[bytes | str, ...] = (*HOP_BY_HOP, *SIDECAR_SET, *drop)
        self._base = frozenset(fold(n) for n in dropped)
        self._drop = self._base
        self._claims: frozenset[bytes] = frozenset()
        self._wrapped_only: frozenset[bytes] = _CREDENTIALS
        self._longest = _LONGEST_EXACT
        self._cache = _Decisions(self._decide, self._CACHE_MAX)
        self._extra: dict[tuple[frozenset[bytes], frozenset[bytes]], _Decisions] = {}

    def set_claim_headers(self, names: Iterable[str]) -> None:
        """Remove, from here on, every ``forward_claims`` header of the whole policy (its
        every spelling, the CGI one included) from what callers send: on both listeners, in
        every section, whether or not the section's rules use the provider that sets it (a
        sidecar keeps only the providers its own section names, so its own claim headers
        alone left a caller's ``X-Tenant`` to the apps of every other section: found by a
        hostile review). Called at every policy swap."""
        claims = frozenset(fold(n.encode("latin-1")) for n in names)
        if claims == self._claims:
            return
        self._claims = claims
        self._reset()

    def set_token_headers(self, names: Iterable[str]) -> None:
        """Remove, from here on, every wrapped spelling of the token headers the policy's
        providers read (``CREDENTIAL_HEADERS``: the plain spelling is the provider's to judge).
        Called at every policy swap."""
        wrapped_only = _CREDENTIALS | frozenset(fold(n.encode("latin-1")) for n in names)
        if wrapped_only == self._wrapped_only:
            return
        self._wrapped_only = wrapped_only
        self._reset()

    def _reset(self) -> None:
        """After the claim or token headers changed: the bounds and the decisions anew."""
        self._longest = max((_LONGEST_EXACT, *(len(n) for n in self._claims),
                             *(len(n) for n in self._wrapped_only)))
        self._drop = self._base | self._claims
        self._cache = _Decisions(self._decide, self._CACHE_MAX)
        self._extra = {}


    @property
    def allow_underscores(self) -> bool:
        """Whether names with ``_`` are kept (``headers.allow_underscores``)."""
        return self._allow_underscores
    def removes(self, name: bytes) -> bool:
        """True if a caller's header called ``name`` (lower-case) must not reach the app."""
        return self._cache[name]

    def _decide(self, name: bytes) -> bool:
        if name.find(b"_") >= 0 and not self._allow_underscores:  # (not `in`: wire._has_close)
            return True
        if name.lower().translate(None, _NAME_BYTES):
            return True  # a character some gateway folds to "_" (see the module docstring)
        n = fold(name)
        if n in self._drop:
            return True
        if n in _CGI_META and n != name.lower():
            # Content_Length / Content_Type (kept with allow_underscores): CGI and WSGI give
            # these two fields variables of their own (CONTENT_LENGTH, CONTENT_TYPE), and a
            # server that reads "_" as "-" (Puma before CVE-2024-45614) let the copy overwrite
            # the real field: a second length the app frames the body by (found by a hostile
            # review: forwarded next to the Content-Length the sidecar framed the body with).
            return True
        if n.startswith(_WRAPPERS) and self._wrapped(n):
            return True
        if n in self._pass:
            return False
        return n in _EXACT or (n.startswith(_PREFIXES) and n not in _NOT_IN_PREFIX)

    def _wrapped(self, n: bytes) -> bool:
        """Whether ``n`` (folded) is a catalogue entry, a sidecar-set or a claim header behind
        one or more wrappers (``WRAPPERS``), or has more than ``MAX_WRAPPERS`` in a row.

        Its work does not grow with the length of ``n`` (before, each wrapper peeled copied
        and hashed the rest of the name: quadratic in the length, found by a hostile review):
        at most ``MAX_WRAPPERS`` offsets are looked at, prefixes are matched in place, and only
        a rest no longer than the longest exact name is sliced off for the set lookups."""
        off = 0
        for _ in range(MAX_WRAPPERS):
            for w in _WRAPPERS:
                if n.startswith(w, off):
                    off += len(w)
                    break
            else:
                return False  # the run of wrappers ended: each inner name was kept
            rest = n[off:] if len(n) - off <= self._longest else None
            if rest is not None and (rest in _EXACT or rest in _SIDECAR_SET
                                     or rest in self._claims or rest in self._wrapped_only):
                return True
            if n.startswith(_PREFIXES, off) and (rest is None or rest not in _NOT_IN_PREFIX):
                return True
        return n.startswith(_WRAPPERS, off)  # one more wrapper: too many in a row

    def _decisions(self, extra: frozenset[bytes], exact: frozenset[bytes]) -> _Decisions:
        """The decisions with ``extra`` (compared folded) and ``exact`` names removed too."""
        decisions = self._extra.get((extra, exact))
        if decisions is None:
            removes = self.removes
            folded = frozenset(fold(n) for n in (*extra, *exact))
            decisions = _Decisions(lambda name: removes(name) or fold(name) in folded,
                                   self._CACHE_MAX)
            if len(self._extra) >= self._EXTRA_MAX:
                self._extra.clear()
            self._extra[(extra, exact)] = decisions
        return decisions

    def clean(self, headers: Iterable[tuple[bytes, bytes]], extra: frozenset[bytes] | set[bytes],
              hop: Set[bytes], exact: frozenset[bytes] = frozenset()) -> list[tuple[bytes, bytes]]:
        """``headers`` without catalogue entries, ``extra`` names, Connection-listed names
        (``hop``) and the names in ``exact`` (the caller's API key header, removed with the
        credentials).

        All of them are compared folded, as the catalogue is: a header the sidecar removes is
        removed in every spelling an app may read as the same (``X_Api_Key`` is
        ``HTTP_X_API_KEY`` to CGI, WSGI and PHP, like ``X-Api-Key``).
        """
        if hop:  # names the caller listed in Connection: this request's own, not kept
            removes = self.removes
            more = {fold(n) for n in (*extra, *hop, *exact)}
            return [h for h in headers if not removes(h[0]) and fold(h[0]) not in more]
        decided = self._decisions(frozenset(extra), exact) if extra or exact else self._cache
        # The kept pairs themselves, not rebuilt: 9.7k -> 8.0k instructions per call.
        return [h for h in headers if not decided[h[0]]]


# The longest header name whose decision is kept (longer ones are decided every time; real
# names are far shorter: the longest in the catalogue has 34 bytes).
KEPT_NAME_BYTES = 128


class _Decisions(dict[bytes, bool]):
    """Name -> removed?, bounded (cleared when full, names of at most ``KEPT_NAME_BYTES``); a
    missing name is decided by ``decide`` and kept. Reading a known name is a plain
    dictionary lookup."""

    __slots__ = ("_decide", "_max")

    def __init__(self, decide: Callable[[bytes], bool], max_entries: int) -> None:
        super().__init__()
        self._decide = decide
        self._max = max_entries

    def __missing__(self, name: bytes) -> bool:
        out = self._decide(name)
        if len(name) > KEPT_NAME_BYTES:
            return out
        if len(self) >= self._max:
            self.clear()
        self[name] = out
        return out


def catalogue_markdown() -> str:
    """The catalogue as the Markdown table docs/SECURITY.md reproduces."""
    rows = ["| header | match | family | why it is removed |", "|---|---|---|---|"]
    for e in CATALOGUE:
        rows.append(f"| `{e.name}` | {'prefix' if e.prefix else 'name'} | {e.family} | {e.reason} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m sidecar.http.untrusted: the table for docs/SECURITY.md
    print(catalogue_markdown())
