"""Benchmarks of ppl_em against scikit-learn and PyMC; see README.md."""
