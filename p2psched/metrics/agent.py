"""The agent's Prometheus metrics, on a registry of its own.

A registry per agent (never the global default) lets several agents share one
process in tests and keeps each agent's /metrics about itself alone.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Buckets from 1 ms to ~2 h: noop WebAssembly jobs finish in well under a
#: millisecond, batch jobs take hours; one histogram has to show both.
JOB_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
                       300, 900, 3600, 7200)


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.queue_length = Gauge("p2psched_queue_length", "Jobs waiting at this agent.", registry=registry)
        self.jobs_total = Counter(
            "p2psched_jobs_total",
            "Jobs whose record here reached each state (an origin counts its forwarded jobs too).",
            ["state", "runtime"], registry=registry,
        )
        self.run_seconds = Histogram(
            "p2psched_job_run_seconds", "Time from start to end of a run.", ["runtime"],
            buckets=JOB_SECONDS_BUCKETS, registry=registry,
        )
        self.queue_seconds = Histogram(
            "p2psched_job_queue_seconds", "Time from acceptance to start.", ["runtime"],
            buckets=JOB_SECONDS_BUCKETS, registry=registry,
        )
        self.slots_in_use = Gauge(
            "p2psched_slots_in_use", "Slots held by running jobs, by kind (cpu, mem_mb, gpu).", ["kind"],
            registry=registry,
        )
        self.admission_rejections = Counter(
            "p2psched_admission_rejections_total", "Submissions refused at the door, by reason.", ["reason"],
            registry=registry,
        )
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self.running = Gauge("p2psched_jobs_running", "Jobs running here now.", registry=registry)
        self.host_retries = Counter(
            "p2psched_job_host_retries", "Jobs this host could not run, queued again (see --host-retries).",
            ["runtime"], registry=registry,
        )
        self.runtime_impaired = Gauge(
            "p2psched_runtime_impaired",
            "1 while this host leaves a runtime's jobs to peers: they kept failing here for the host's fault.",
            ["runtime"], registry=registry,
        )
        self.jobs_pruned = Counter(
            "p2psched_jobs_pruned", "Finished jobs deleted from the store after the retention time.", registry=registry
        )

    def job_state(self, state: str, runtime: str) -> Any:
        """The jobs_total child for (state, runtime), cached: labels() is costly per job."""
        return self.child(self.jobs_total, state, runtime)

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: the per-job metrics would pay a lookup each."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child
