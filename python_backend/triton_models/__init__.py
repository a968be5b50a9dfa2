"""model.py adapters copied into the model repository by exporters.repository."""
