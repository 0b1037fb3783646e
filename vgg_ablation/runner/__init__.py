"""A study run: one Hydra multirun as a process (`sweeps`), cells as SLURM jobs (`cluster`), the
lr selection and convergence launches (`phases`), archives in and out (`travel`), and the
study's looks from first to last (`study`).

The layers and what each may import: docs/layout.md."""
