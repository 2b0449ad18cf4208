"""finemem reward package."""
