"""Reading a member's open watchers and watch streams from etcd's Prometheus text (what the
watch-leak tests compare against a baseline)."""

from __future__ import annotations

import pytest

from defender_devcluster._etcd import parse_watch_counts

METRICS = """\
# HELP etcd_debugging_mvcc_watch_stream_total Total number of watch streams.
# TYPE etcd_debugging_mvcc_watch_stream_total gauge
etcd_debugging_mvcc_watch_stream_total 2
# HELP etcd_debugging_mvcc_watcher_total Total number of watchers.
# TYPE etcd_debugging_mvcc_watcher_total gauge
etcd_debugging_mvcc_watcher_total 5
etcd_debugging_mvcc_watcher_total_other 9
grpc_server_started_total{grpc_method="Watch",grpc_service="etcdserverpb.Watch"} 7
"""


def test_reads_watchers_and_streams() -> None:
    assert parse_watch_counts(METRICS) == (5, 2)


def test_a_missing_gauge_is_an_error_not_zero() -> None:
    without = "\n".join(line for line in METRICS.splitlines() if "watch_stream_total" not in line)
    with pytest.raises(ValueError, match="watch_stream_total"):
        parse_watch_counts(without)
