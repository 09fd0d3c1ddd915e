"""The pipeline's stages as plain functions (sdrpn_core + storage, no Prefect), one module per stage, each ending
with its `Stage` declaration (run, lookup, key, the code it depends on). `tasks/` wraps each in a Prefect task;
the CLI, scripts and tests can call them directly (`Stage.ensure` looks the output up once, then runs).
"""
