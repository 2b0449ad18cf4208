"""finemem rollout package."""
