"""`kubectl defender`: a kubectl plugin to look at and steer the ML Defender config plane.

    kubectl defender status | diff | history | rollback | rotate-key | alerts | dump

It reads etcd through the shared library (`defender_config`) and asks the operator for changes
through annotations on Kubernetes objects, so the operator stays the only writer of keys.
"""

from ._app import main

__all__ = ["main"]
