"""Shared fixtures for every test folder.

Cluster fixtures come from defender_devcluster.pytest_plugin (see docs/local-cluster.md):
defender_etcd, etcd_prefix, local_cluster, kubeconfig_path, k8s_api, namespace.
"""

pytest_plugins = ["defender_devcluster.pytest_plugin"]
