"""Who may talk to an instance that spans hosts: the cluster secret (`secret`), the control
connections' handshake and per-frame tags (`channel`), ZeroMQ CURVE on the data plane and the
expert backups (`curve`), and the bounded log of refused peers (`rejections`). The model and
what the operator must protect: docs/security.md."""
