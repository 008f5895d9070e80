"""The Kubernetes API client the plugin's commands use: every request bounded in time. Imported
only when a command reaches Kubernetes (it loads the kubernetes client)."""

from __future__ import annotations

from typing import Any

from kubernetes.client import ApiClient, Configuration
from kubernetes.config import load_kube_config
from urllib3 import Retry


class BoundedApiClient(ApiClient):
    """An ApiClient whose requests carry `request_timeout` unless a call gives its own. The
    generated client waits forever by default, so an API server that accepts the connection and
    never answers (or drops packets) would hang the command."""

    def __init__(self, configuration: Configuration, request_timeout: float) -> None:
        self.request_timeout = request_timeout
        super().__init__(configuration=configuration)

    def call_api(
        self,
        method: Any,
        url: Any,
        header_params: Any = None,
        body: Any = None,
        post_params: Any = None,
        _request_timeout: Any = None,
    ) -> Any:
        return super().call_api(
            method,
            url,
            header_params,
            body,
            post_params,
            _request_timeout=_request_timeout or self.request_timeout,
        )


def bounded_client(config_file: str | None, context: str | None, timeout: float) -> Any:
    """What `kubernetes.config.new_client_from_config` builds, with every request bounded by
    `timeout` seconds."""
    configuration = Configuration()
    load_kube_config(config_file=config_file, context=context, client_configuration=configuration)
    # urllib3 retries a failed connection or read three times by default: a timeout would then
    # cost four times the flag. One attempt for each; redirects are still followed (up to 3, as
    # urllib3's default allows).
    configuration.retries = Retry(total=None, connect=0, read=0, other=0, redirect=3)
    return BoundedApiClient(configuration, timeout)
