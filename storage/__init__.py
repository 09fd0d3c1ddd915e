"""Stores on any fsspec filesystem: Parquet labels, artifacts, content fingerprints. Knows nothing of Prefect."""
