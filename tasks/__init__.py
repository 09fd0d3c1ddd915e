"""Thin Prefect tasks, one per pipeline stage; they call `sdrpn_core` and `storage` and hold no method logic."""
