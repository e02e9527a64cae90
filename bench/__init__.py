"""Benchmarks and the demo training run of shampoo-core (``python -m bench --help``)."""
