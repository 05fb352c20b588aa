#!/bin/sh
# vmferry guest /init (busybox sh, PID 1 of the initramfs).
# Kernel parameters: ferry.ip=A.B.C.D/NN ferry.gw=A.B.C.D ferry.hostname=NAME
#   ferry.roles=heartbeat,udpecho,... ferry.dirty=SIZE@RATE[:full] ferry.disk=/dev/vda
export PATH=/bin
umask 022

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=0755 tmpfs /run
# The kernel may have had no /dev/console before devtmpfs: (re)attach stdio.
exec </dev/console >/dev/console 2>&1

for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci \
	failover net_failover virtio_net virtio_blk button evdev; do
	insmod "/lib/modules/$m.ko" || echo "FERRY-WARN insmod $m failed"
done

IP=
GW=
HOST=
ROLES=
DIRTY=
DISK=
for w in $(cat /proc/cmdline); do
	case "$w" in
	ferry.ip=*) IP="${w#ferry.ip=}" ;;
	ferry.gw=*) GW="${w#ferry.gw=}" ;;
	ferry.hostname=*) HOST="${w#ferry.hostname=}" ;;
	ferry.roles=*) ROLES="${w#ferry.roles=}" ;;
	ferry.dirty=*) DIRTY="${w#ferry.dirty=}" ;;
	ferry.disk=*) DISK="${w#ferry.disk=}" ;;
	esac
done
[ -n "$ROLES" ] || ROLES=heartbeat,udpecho,tcpecho,power
[ -n "$HOST" ] && hostname "$HOST"

ip link set lo up
if [ -n "$IP" ]; then
	if ip link set eth0 up; then
		ip addr add "$IP" dev eth0 || echo "FERRY-WARN cannot set address $IP"
		if [ -n "$GW" ]; then
			ip route add default via "$GW" || echo "FERRY-WARN cannot add route via $GW"
		fi
	else
		echo "FERRY-WARN no eth0"
	fi
fi

set -- --guest
[ -n "$DIRTY" ] && set -- "$@" --dirty "$DIRTY"
[ -n "$DISK" ] && set -- "$@" --disk "$DISK"
SHOW_IP=none
[ -n "$IP" ] && SHOW_IP="${IP%/*}"
echo "FERRY-READY ip=$SHOW_IP roles=$ROLES"

# PID 1 must never exit: respawn the probe if it dies.
while :; do
	/bin/probe "$@" "$ROLES"
	echo "FERRY-PROBE-EXIT rc=$?"
	sleep 1
done
