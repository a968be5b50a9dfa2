"""NumPy reference of everything between and after the two networks (the CPU path).

``ops``: the operator set every fast path is tested against; ``contract``: the input checks and
result types it shares with :mod:`python_backend.cuda`.
"""
