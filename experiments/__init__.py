"""Comparative experiments: sweeps of trials (Ray Tune or one after another), their statistics and reports."""
