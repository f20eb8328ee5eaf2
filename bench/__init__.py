"""Benchmarks of serpentmail against Postfix and Dovecot (see bench/README.md)."""
