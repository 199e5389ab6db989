"""Layer 6: what is computed from a fit: standard errors, model selection, cross-checks."""
