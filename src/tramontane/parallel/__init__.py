"""Sharding plans on torch.distributed: which rank holds which part (plan.py), the swaps (shard.py)."""
