"""Prefect flows composing the stages, and the `sdrpn` command line."""
