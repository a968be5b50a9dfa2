"""NumPy reference of everything between and after the two networks (the CPU path)."""
