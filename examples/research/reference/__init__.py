"""The authors' EAR code, imported from a checkout outside this repository, for parity checks and benchmarks."""
