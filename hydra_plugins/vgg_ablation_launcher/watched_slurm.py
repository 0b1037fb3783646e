"""The project's SLURM launcher, where Hydra looks for launchers (the `hydra_plugins` namespace):
Hydra's submitit `SlurmLauncher` with a wait that always ends (vgg_ablation/runner/cluster.py says how).
The presets conf/hydra/launcher/slurm*.yaml name it. Without the `[cluster]` extra (submitit and
Hydra's launcher) there is nothing to subclass and nothing is defined: Hydra scans this module at
every start, and a missing extra must cost a user who never asked for SLURM nothing."""

from __future__ import annotations

from collections.abc import Sequence

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
except ImportError:  # the [cluster] extra is not installed
    SlurmLauncher = None

if SlurmLauncher is not None:

    class WatchedSlurmLauncher(SlurmLauncher):
        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
            from vgg_ablation.runner.cluster import launch_watched

            return launch_watched(self, job_overrides, initial_job_idx)
