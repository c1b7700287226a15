"""ml_collections config files: `base.py` holds every field; the others set the method (estimator, loss, critic)."""
