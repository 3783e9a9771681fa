"""The data plane: dispatch/combine between ranks over an exchange (shared memory, gloo, loopback)."""
