"""Where the configs live: inside the package (a wheel carries them), with the repository's
top-level conf/ and experiments/ as links to them, so that no two copies can drift."""

from pathlib import Path

import pytest

from vgg_ablation.config import CONF_DIR, compose, studies, study_overrides

REPO = Path(__file__).resolve().parent.parent


def test_the_top_level_folders_are_links_to_the_packages_configs():
    assert (REPO / "conf").is_symlink() and (REPO / "conf").resolve() == CONF_DIR
    assert (REPO / "experiments").is_symlink() and (REPO / "experiments").resolve() == CONF_DIR / "experiment"
    assert CONF_DIR.is_relative_to(REPO / "vgg_ablation") and not CONF_DIR.is_symlink()
    shown = sorted(p.name for p in (REPO / "experiments").glob("*.yaml"))
    assert shown == sorted(f"{s}.yaml" for s in studies()) and "cifar10-cpu.yaml" in shown


def test_a_study_in_a_users_own_folder(tmp_path):
    (tmp_path / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /trainer: smoke\nstudy:\n  name: mine\n  archs: [A, B]\n"
    )
    cfg = compose(study_overrides(["experiment=mine", f"study_dir={tmp_path}"]))
    assert cfg.study.name == "mine" and list(cfg.study.archs) == ["A", "B"] and cfg.trainer.max_epochs == 1
    assert "mine" in studies([f"study_dir={tmp_path}"])


@pytest.mark.slow
@pytest.mark.long
def test_installed_from_a_wheel_it_trains_studies_and_reports_from_another_folder(tmp_path):
    """The install check (.ci/install-check.sh): a wheel into a fresh virtual environment, then
    from another folder a tiny train, the smoke study, its report, and a study kept in that
    folder; a traceback anywhere fails it. The dependencies are this environment's (DEPS_FROM,
    the wheel alone installed, `pip check`): `make install-check` installs them from scratch."""
    import os
    import subprocess
    import sys

    if os.environ.get("VGG_ABLATION_SKIP_INSTALL_CHECK"):
        pytest.skip("VGG_ABLATION_SKIP_INSTALL_CHECK is set")
    proc = subprocess.run(["bash", str(REPO / ".ci" / "install-check.sh"), str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "PYTHON": sys.executable, "DEPS_FROM": sys.executable})  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "install check passed: vgg-ablation" in proc.stdout
    assert "the package imported from the wheel's install" in proc.stdout
    assert "configs inside the wheel" in proc.stdout and "names where it was looked for" in proc.stdout
