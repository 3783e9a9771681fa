"""What the project needs to test itself as it would run: a private etcd server (and, later,
network-namespace hosts). Started and torn down by the project, never by hand."""
