"""Where the configs live: inside the package (a wheel carries them), with the repository's
top-level conf/ and experiments/ as links to them, so that no two copies can drift."""

from pathlib import Path

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
