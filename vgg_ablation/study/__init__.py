"""What a study is and where it stands: the stopping rule (`sequential`), what an undecided
comparison would take (`plans`), the claims and their verdicts (`analysis`), the study's cells
and their names (`cells`), where it stands, read once a look (`snapshot`), and the cells beside
its test cells (`reference_cells`: lr selection, convergence).

The layers and what each may import: docs/layout.md."""
