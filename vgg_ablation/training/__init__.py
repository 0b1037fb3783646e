"""One cell: its objects from a config (`build`, no MLflow or Lightning), the LightningModule and
the Trainer (`module`, `fitting`), its MLflow run (`cell_run`), its lines in a study
(`progress`), checkpoints, several devices, where its time goes, and the Hydra task (`train`).

The layers and what each may import: docs/layout.md."""
