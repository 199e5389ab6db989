"""Example mixture models users can run; each module has ``build_model`` and ``default_data``."""
