#!/usr/bin/env bash
# Namespace hosts for trying eep across hosts on one machine (root):
#   scripts/netns-hosts.sh up N [--etcd]   N network namespaces eep-hosts-h0.. joined by a bridge in
#                                          eep-hosts-br, addresses 10.77.0.1.. that exist only inside
#                                          them (and a 3-member etcd cluster on the first three, with
#                                          authentication on: `eep secret etcd-grant` makes a user)
#   scripts/netns-hosts.sh down            kill everything running in them and remove them
# Run a command on host i: ip netns exec eep-hosts-h$i COMMAND. Tests make their own (eep/testbed).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m eep.testbed.netns "$@"
