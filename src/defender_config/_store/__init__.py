"""etcd access: this package is the only code that imports pyetcd or grpc.

Built on `pyetcd` (etcd-sdk-python, the maintained fork of python-etcd3) and its
`MultiEndpointEtcd3Client`. On top of it this module adds what the library needs:

* retries of transient failures only (UNAVAILABLE, DEADLINE_EXCEEDED, connection failures, a
  stream reset by a member shutting down, a proposal dropped by a leader handing over), with
  exponential backoff and full jitter; failed compares, auth and argument errors are not retried;
* one table (`_RULES`) that maps gRPC codes and pyetcd exceptions to our typed errors;
* endpoint failover that never gives up on the cluster while retries remain (pyetcd refuses to
  try when every endpoint failed recently; we try the one that failed longest ago instead);
* thread safety: one client is shared by every thread; endpoint switching is locked;
* watches that survive a member dying: re-created on another endpoint from the last revision
  they delivered, callbacks run on the watch's own thread;
* a last-known-good read cache served (flagged stale) when no endpoint answers;
* Prometheus metrics, health, leases and transactions.
"""

from ._etcd_store import EtcdStore
from ._pyetcd import parse_endpoint
from ._rules import ErrorRule, classify_error
from ._watch import WatchHandle

__all__ = ["ErrorRule", "EtcdStore", "WatchHandle", "classify_error", "parse_endpoint"]
