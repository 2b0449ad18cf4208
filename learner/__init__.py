"""finemem learner package."""
