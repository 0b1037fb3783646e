"""Data: what is on disk, read safely (`datasets`), batches cut and augmented in memory
(`batches`), and the splits and data modules a cell trains on (`modules`).

The layers and what each may import: docs/layout.md."""
