"""``/metrics`` in the Prometheus text format.

Counters of submissions live in Redis (every service process sees the same totals); request
counters are this process's own, as Prometheus expects of a per-instance scrape target.
"""

from __future__ import annotations

from collections import Counter

from cellblock.service.store import Store


def _labels(**labels: str) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return f"{{{inner}}}" if inner else ""


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, int]] = Counter()

    def request(self, method: str, handler: str, status: int) -> None:
        self.requests[(method, handler, status)] += 1

    async def render(self, store: Store) -> str:
        workers = await store.workers()
        counters = await store.counters()
        lines = [
            "# HELP cellblock_queued Submissions waiting for an executor.",
            "# TYPE cellblock_queued gauge",
            f"cellblock_queued {await store.queued()}",
            "# HELP cellblock_workers Live workers by kind.",
            "# TYPE cellblock_workers gauge",
        ]
        for kind in ("executor", "builder"):
            count = sum(w["kind"] == kind for w in workers)
            lines.append(f"cellblock_workers{_labels(kind=kind)} {count}")
        lines += [
            "# HELP cellblock_slots Sandbox slots of live executors, by state.",
            "# TYPE cellblock_slots gauge",
            f"cellblock_slots{_labels(state='busy')} "
            f"{sum(w.get('busy', 0) for w in workers if w['kind'] == 'executor')}",
            f"cellblock_slots{_labels(state='total')} "
            f"{sum(w.get('slots', 0) for w in workers if w['kind'] == 'executor')}",
            "# HELP cellblock_submissions_total Submissions accepted.",
            "# TYPE cellblock_submissions_total counter",
            f"cellblock_submissions_total {counters.get('submitted', 0)}",
            "# HELP cellblock_submissions_ended_total Submissions ended, by final status.",
            "# TYPE cellblock_submissions_ended_total counter",
        ]
        for status in ("finished", "cancelled", "error"):
            value = counters.get(f"ended:{status}", 0)
            lines.append(f"cellblock_submissions_ended_total{_labels(status=status)} {value}")
        lines += [
            "# HELP cellblock_http_requests_total HTTP requests answered by this process.",
            "# TYPE cellblock_http_requests_total counter",
        ]
        for (method, handler, code), count in sorted(self.requests.items()):
            labels = _labels(method=method, handler=handler, code=str(code))
            lines.append(f"cellblock_http_requests_total{labels} {count}")
        return "\n".join(lines) + "\n"
