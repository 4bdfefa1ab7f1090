"""Prometheus metrics and the health endpoints of one consumer (``mtc75.Consumer(metrics_port=...)`` /
``metrics_registry=...``, ``--metrics-port``). Imported only when asked for: prometheus-client is an optional
dependency (the ``metrics`` and ``cli`` extras)."""
