"""The data plane: moving token activations between ranks.

- `dispatch`: DeepEP-shaped dispatch / combine over any `Exchange` (all-to-all of bytes).
- `loopback`: in-process exchange for thread ranks (tests); `gloo`: torch.distributed baseline.
- `shm`: the one-host transport — controller-owned shared-memory regions, one per
  (source, destination) pair, epoch/step-stamped messages, futex waits with timeouts.
- `futex`: the blocking wait/wake primitive `shm` uses.
"""
