"""Push a run's summary metrics to a Prometheus Pushgateway.

Batch jobs (training, evaluation) end before Prometheus could scrape them, so they
push their final numbers to a Pushgateway instead. Monitoring must never fail a
pipeline run: with no gateway configured this is a no-op, and an unreachable
gateway only logs a warning.

Usage::

    push_run_metrics("prvr-train", {"duration_seconds": 812.4, "epochs": 37, "best_sumr": 171.2},
                     labels={"collection": "tvr"})     # gateway from $PRVR_PUSHGATEWAY

Each push replaces the job's group, and stages push only when they succeed, with
``LAST_SUCCESS`` = now among the values: ``prvr_run_last_success_timestamp_seconds{job=...}``
is then the time of the job's last success, which deploy/prometheus/alerts.yaml watches
(Prometheus scrapes the gateway with honor_labels, so ``job`` stays the pushed one).
"""
from __future__ import annotations

import logging
import math
import os
import re
from typing import Mapping

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

__all__ = ["push_run_metrics", "metric_name", "GATEWAY_ENV", "PREFIX", "LAST_SUCCESS"]

GATEWAY_ENV = "PRVR_PUSHGATEWAY"
PREFIX = "prvr_run_"
LAST_SUCCESS = "last_success_timestamp_seconds"   # -> prvr_run_last_success_timestamp_seconds
TIMEOUT_S = 3.0

log = logging.getLogger(__name__)


def metric_name(key: str, prefix: str = PREFIX) -> str:
    """``"best sumr"`` -> ``prvr_run_best_sumr`` (Prometheus allows [a-zA-Z0-9_:] only)."""
    name = re.sub(r"[^a-zA-Z0-9_]", "_", key.strip()).strip("_").lower()
    if not name:
        raise ValueError(f"metric key {key!r} gives an empty metric name")
    return prefix + name


def push_run_metrics(job: str, metrics: Mapping[str, float], gateway: str | None = None,
                     labels: Mapping[str, str] | None = None, prefix: str = PREFIX) -> bool:
    """Push ``metrics`` as gauges under ``job`` (grouped by ``labels``); True when pushed.

    ``gateway`` is host:port or a URL; default ``$PRVR_PUSHGATEWAY``. Non-numeric and
    NaN values are skipped. Returns False (and does nothing else) when no gateway is
    configured or the push fails.
    """
    gateway = gateway or os.environ.get(GATEWAY_ENV) or None
    if not gateway:
        return False
    registry = CollectorRegistry()
    pushed = 0
    for key, value in metrics.items():
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (int, float)) or math.isnan(value):
            log.debug("monitoring: skipping non-numeric metric %r=%r", key, value)
            continue
        Gauge(metric_name(key, prefix), f"prvr run metric {key}", registry=registry).set(float(value))
        pushed += 1
    if not pushed:
        return False
    grouping = {str(k): str(v) for k, v in (labels or {}).items()}
    try:
        push_to_gateway(gateway, job=job, registry=registry, grouping_key=grouping, timeout=TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - any failure (DNS, refused, HTTP 4xx/5xx) is only a warning
        log.warning("monitoring: could not push %d metric(s) of job %r to Pushgateway %s: %s",
                    pushed, job, gateway, exc)
        return False
    return True
