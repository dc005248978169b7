"""What tests and benchmarks share: real servers, the fault proxy, reliability scenarios.

Not part of the shipped wheel (pyproject's package list names uploader and ckpt only);
it is imported from a checkout, with the repository root on ``sys.path``.
"""
