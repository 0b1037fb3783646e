"""The command line (`cli`: one table of commands) and the commands around a study: the
benchmarks, the prepared GPU check, the dashboard walked in a browser, `vgg-ablation ui`.

The layers and what each may import: docs/layout.md."""
