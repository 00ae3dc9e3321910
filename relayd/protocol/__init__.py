"""The relay protocol of one instance, Sans-I/O: sessions, routing, storing and answering messages, the backlog,
receipts, budgets and push subscriptions. It reaches storage, sign-in, sessions and its peers (other relayd instances) only through the typed
interfaces in ``seams``; it never imports the cluster, the transport or the REST API."""
