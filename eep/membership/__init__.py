"""Membership: the committed view of which ranks serve (epoch, per-rank state, incarnations)."""
