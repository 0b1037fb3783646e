"""A study's report: its runs gathered and the report written and published (`document`), one
renderer per section (`sections`), the figures (`plots`).

The layers and what each may import: docs/layout.md."""
