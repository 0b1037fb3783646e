"""Tracking: MLflow stores and runs, a run's records kept on disk until the store takes them,
the lab server, a study's archive, and a study's runs as a table. Nothing here knows of data,
nets or training.

The layers and what each may import: docs/layout.md."""
