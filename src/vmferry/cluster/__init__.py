"""Failover clustering: etcd store, node leases, leader election, self-fencing, shared volumes."""

from vmferry.cluster.etcd import Etcd, EtcdUnavailable
from vmferry.cluster.member import ClusterMember
from vmferry.cluster.store import ClusterStore

__all__ = ["ClusterMember", "ClusterStore", "Etcd", "EtcdUnavailable"]
