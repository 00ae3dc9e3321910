"""Push notifications that wake an offline device without telling the push service who wrote (extra relayd[push]).

``subscriptions`` (what a client may register; endpoint checks against SSRF), ``tokens`` (ES256/RS256 JWTs),
``http`` (bounded HTTP/1.1 requests to a checked address), ``http2`` (one reused HTTP/2 connection),
``webpush`` (RFC 8291 encryption, RFC 8292 VAPID), ``fcm`` (FCM HTTP v1 with an OAuth2 service-account grant),
``apns`` (HTTP/2 with a provider token), ``sender`` (the bounded queue, collapse, retries, removal, metrics)
and ``service`` (what the protocol, the REST API and the composition root see). Only ``service`` is imported
by the composition root, and only when ``[push] enabled``: the daemon runs without ``cryptography`` and ``h2``.
"""
