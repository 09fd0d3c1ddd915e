"""The pipeline's stages as plain functions (sdrpn_core + storage, no Prefect), one module per stage.

`tasks/` wraps each in a Prefect task; the CLI and tests can call them directly. Every stage is idempotent: it
first looks in the store for its output under its fingerprint and returns that if it is committed.
"""
