"""fxprune's passes (installed as `fxprune.passes`): dependency analysis, importance, allocation, rewrite."""
