"""Failover clustering: etcd store, node leases, leader election, self-fencing, shared volumes.

The package imports nothing itself: the fence guard (``python -m vmferry.cluster.guard``) is a
separate small process and should not load the etcd client, the host layer and their
dependencies it never uses (half a second of CPU at every start).
"""
