"""The control-plane HTTP kit: one small h11 client and one small h11 server.

The data path has its own lean readers and pools (``sidecar.net``); this package is for the
side jobs, where every byte is bounded and nothing is pooled:

* ``client.request``: one HTTP/1.1 request on a fresh connection (JWKS, discovery metadata,
  token introspection, alert webhooks, the app's kubelet probes);
* ``server``: the listener, connection limits (in total and per source address), optional TLS
  with a context read at accept time, and the h11 request/answer loop with deadlines, shared
  by the admin and health servers and the admission webhook.
"""
