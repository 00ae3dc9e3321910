"""The relay protocol of one instance, Sans-I/O: sessions, routing, storing and answering messages, the backlog,
receipts and budgets. It reaches storage, sign-in, sessions and its peers (other relayd instances) only through the typed
interfaces in ``seams``; it never imports the cluster, the transport or the REST API."""
