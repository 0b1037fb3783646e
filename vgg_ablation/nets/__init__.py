"""Nets: the zoo as data (`models`: the paper's configurations, LeNet, AlexNet, the 5x5 control)
and the designs' arithmetic (`design`: receptive fields, parameter counts, summaries).

The layers and what each may import: docs/layout.md."""
