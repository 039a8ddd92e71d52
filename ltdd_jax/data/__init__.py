"""Long-tailed data: sources, the deterministic LT splits, preprocessing and the assembled Dataset."""
