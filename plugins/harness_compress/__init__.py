"""Layer pruning criteria and distillation losses."""
