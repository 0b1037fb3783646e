"""Which cells a study has and what they are called: its nets (with the scratch-B control), its
seeds and looks (`design_of`), the claims and rule it registers, and the fingerprints that find its
runs. Naming only: nothing here reads a store (where a study stands is snapshot.py's).

Below the builders and the orchestrator: the study, the report and the training task all ask
here, and nothing here trains or launches anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from vgg_ablation import __version__
from vgg_ablation.errors import UserError
from vgg_ablation.study import analysis
from vgg_ablation.tracking.runtable import SCRATCH

SCRATCH_CONTROL = ["model.init=kaiming"]  # the overrides that make the scratch-B control
SCRATCH_LABEL = f"B{SCRATCH}"
# Set by the study for its cells (environment, so that any Hydra launcher carries them):
# "<cells before this launch>:<cells in the study>:<start time>:<recorded seconds of its FINISHED
# cells>:<how many>:<cells of this launch already FINISHED>:<cells trained at once>" (progress.Progress reads it)
PROGRESS_ENV = "VGG_ABLATION_PROGRESS"
DEADLINE_ENV = "VGG_ABLATION_DEADLINE"  # epoch seconds after which a cell of the study does not start


# Keys that do not change what a run computes: excluded from the fingerprint.
NON_SEMANTIC = {
    "arch",
    "seed",
    "study.archs",
    "study.seeds",
    "study.description",
    "study.margins",
    "study.min_effect",
    "study.max_seeds",
    "study.seeds_per_look",
    "study.alpha",
    "study.time_limit",
    "study.futility",
    "study.claims",
    "study.parallel",
    "study.reports_dir",
    "study.next_step",
    "study.lr_grid",
    "study.lr_seeds",
    "study.convergence_epochs",
    "study.convergence_seeds",
    "study.convergence_tolerance",
    "logger",
    "bench",
    "archive",
    "trainer.progress_bar",
    "trainer.threads",
    "trainer.compile",  # speed settings: a study resumed with compile on keeps its finished cells
    "trainer.compile_backend",
    "data.num_workers",
    "data.root",
}


# Keys added after studies were registered, at the value that computes what those studies did:
# left out of the fingerprint at that value, so the studies' cells keep their keys. (An empty
# mapping, optim.lr_per_arch's default, adds nothing to it anyway.)
NEUTRAL = {"trainer.test": True}


def fingerprint(cfg: DictConfig, digest: str | None = None) -> str:
    """Short hash of everything that changes what a cell computes (not arch, seed, logging).
    The data enters by its digest (file list and sizes), not its path: a moved folder keeps its
    cells, different images under the same name get new ones. `digest`: the data's, when known
    without reading it (a report on a machine without the data)."""
    from vgg_ablation.data.datasets import identify

    flat: dict[str, Any] = {"data.digest": digest or identify(cfg.data).digest}

    def walk(node: Any, prefix: str) -> None:
        if prefix in NON_SEMANTIC:
            return
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else key)
        elif not (prefix in NEUTRAL and node == NEUTRAL[prefix]):
            flat[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:12]


def cell_cfg(cfg: DictConfig, arch: str, seed: int) -> DictConfig:
    """The config of another cell (arch, seed) of the same study."""
    cell = cfg.copy()
    with open_dict(cell):
        cell.arch, cell.seed = arch, seed
    return cell


def cell_key(cfg: DictConfig, fp: str | None = None) -> str:
    """The tag that finds a cell's runs; `fp`: its config's fingerprint, when already known."""
    return f"{cfg.study.name}/{cfg.data.name}/{cfg.arch}/seed={cfg.seed}/{fp or fingerprint(cfg)}"


def cell_keys(cfg: DictConfig, seeds) -> dict[tuple[str, int], str]:
    """Each (net, seed) of the study's nets and these seeds -> its cell key."""
    keys = {}
    for label, net_cfg in cell_configs(cfg):
        arch, fp = ("B" if label == SCRATCH_LABEL else label), fingerprint(net_cfg)
        keys.update({(label, seed): cell_key(cell_cfg(net_cfg, arch, seed), fp) for seed in seeds})
    return keys


def study_run_key(cfg: DictConfig) -> str:
    """The tag that finds a study's own run: one per study and config fingerprint."""
    return f"{cfg.study.name}/{fingerprint(cfg)}"


def needs_scratch_b(cfg: DictConfig) -> bool:
    """B-5x5 trains from scratch (nothing of A fits its 5x5 convs): in a study whose deeper nets
    start from A, a claim whose nets must start alike (`Claim.same_start`: claim 4, B vs B-5x5)
    needs a B trained from scratch too, or it compares starts, not filters. B is the one net with
    such a twin; a same-start claim on another net is listed as untested, with what it needs."""
    archs = set(cfg.study.archs)
    return cfg.model.init == "from_A" and any(
        c.same_start and c.first == "B" and {c.first, c.second} <= archs for c in analysis.CLAIMS
    )


def scratch_config(cfg: DictConfig) -> DictConfig:
    scratch = cfg.copy()
    with open_dict(scratch):
        scratch.model.init = "kaiming"
    return scratch


def cell_configs(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """(label, config) of every net the study trains: its archs, plus 'B (scratch)' when needed."""
    nets = [(arch, cfg) for arch in cfg.study.archs]
    if needs_scratch_b(cfg):
        nets.append((SCRATCH_LABEL, scratch_config(cfg)))
    return nets


def net_labels(cfg: DictConfig) -> list[str]:
    return [label for label, _ in cell_configs(cfg)]


def study_fingerprints(cfg: DictConfig, digest: str | None = None) -> list[str]:
    fps = [fingerprint(cfg, digest)]
    if needs_scratch_b(cfg):
        fps.append(fingerprint(scratch_config(cfg), digest))
    return fps


def margins_of(cfg: DictConfig) -> dict[str, float]:
    """Each claim's margin as a fraction of top-1 error (the config says points)."""
    return {k: v / 100 for k, v in OmegaConf.to_container(cfg.study.margins).items()}


def claims_of(cfg: DictConfig, registered: dict | None = None) -> tuple:
    """The claims the study considers: those it was registered with (its run's claim_ids), so that a
    claim the project gains later never changes a study under way (its comparisons, so its error
    split); else the project's (analysis.claims_for its study.claims). One line when unknown."""
    try:
        if registered and "claim_ids" in registered:
            return analysis.claims_by_id(registered["claim_ids"].split(CLAIM_ID_SEPARATOR))
        return analysis.claims_for(list(cfg.study.claims))
    except ValueError as exc:
        raise UserError(str(exc)) from None


CLAIM_ID_SEPARATOR = "; "


def design_of(cfg: DictConfig, registered: dict | None = None) -> analysis.Design:
    """The study's seeds, looks, rule and claims; `registered` holds the rule its study run was
    created with (a continued study keeps its horizon and its claims)."""
    claims = claims_of(cfg, registered)
    tested, _ = analysis.testable(net_labels(cfg), cfg.model.init == "from_A", claims)
    horizon = int(registered["rule.horizon"]) if registered and "rule.horizon" in registered else None
    design = analysis.make_design(list(cfg.study.seeds), cfg.study.max_seeds, cfg.study.seeds_per_look,
                                  cfg.study.alpha, len(tested), horizon, futility_of(cfg, registered))  # fmt: skip
    return dataclasses.replace(design, claims=claims)


def futility_of(cfg: DictConfig, registered: dict | None = None) -> float:
    """The futility threshold the study's looks use: the one it registered (a study registered
    before futility stops existed has none: 0), else the config's."""
    if registered and any(k.startswith("rule.") for k in registered):
        return float(registered.get("rule.futility", 0.0))
    return float(cfg.study.futility) if cfg.study.max_seeds else 0.0


def rule_params(cfg: DictConfig, registered: dict | None = None) -> dict[str, str]:
    """What a run-until-decided study registers on its run before any cell: a different value
    later would be a different rule (and the looks already taken were made under this one).
    `registered`: what it was registered with, whose claims it keeps."""
    if not cfg.study.max_seeds:
        return {}
    margins = OmegaConf.to_container(cfg.study.margins)
    design = design_of(cfg, registered)
    return {
        "rule.alpha": str(cfg.study.alpha),
        "rule.first_seeds": ",".join(map(str, cfg.study.seeds)),
        "rule.seeds_per_look": str(cfg.study.seeds_per_look),
        "rule.comparisons": str(design.rule.comparisons),
        "rule.horizon": str(cfg.study.max_seeds),
        "rule.margins": ",".join(f"{k}={v:g}" for k, v in margins.items()),
        **({"rule.futility": f"{cfg.study.futility:g}"} if cfg.study.futility else {}),
        **({"rule.claims": ",".join(cfg.study.claims)} if cfg.study.claims else {}),
    }


def study_params(cfg: DictConfig) -> dict:
    """What a user filters studies by, on the study's run (cells carry their own params)."""
    margins = OmegaConf.to_container(cfg.study.margins)
    return {
        "data": cfg.data.name,
        "epochs": cfg.trainer.max_epochs,
        "width": cfg.model.width,
        "batch_norm": cfg.model.batch_norm,
        "init": cfg.model.init,
        "dropout": cfg.model.dropout,
        "lr": cfg.optim.lr,
        **(
            {"lr_per_arch": ",".join(f"{k}={v:g}" for k, v in cfg.optim.lr_per_arch.items())}
            if cfg.optim.lr_per_arch
            else {}
        ),  # fmt: skip
        "schedule": cfg.optim.schedule,
        "warmup_epochs": cfg.optim.warmup_epochs,
        "batch_size": cfg.data.batch_size,
        "margins_points": ",".join(f"{k}={v:g}" for k, v in margins.items()),
        "min_effect_points": cfg.study.min_effect,
        # the claims it considers, kept for good: a claim the project gains later is not this study's
        "claim_ids": CLAIM_ID_SEPARATOR.join(c.id for c in claims_of(cfg)),
        "fingerprint": fingerprint(cfg),
        "version": __version__,
    }


def check_registered(cfg: DictConfig, registered: dict) -> None:
    """Refuse a run-until-decided study whose rule differs from the one it was registered with
    (a larger `max_seeds` is allowed: it continues the study past its horizon)."""
    wanted = rule_params(cfg, registered)
    had = {k: v for k, v in registered.items() if k.startswith("rule.")}
    if not had:
        if wanted and registered:
            raise UserError(f"study {cfg.study.name!r} already ran as a fixed-seed study: to run it until "
                            "decided, give it a new name (study.name=...) and new seeds")  # fmt: skip
        return
    if not wanted:
        raise UserError(f"study {cfg.study.name!r} runs until decided (registered with max_seeds="
                        f"{had['rule.horizon']}): keep study.max_seeds set")  # fmt: skip
    # A study registered before futility stops existed keeps its looks without them (rule.futility
    # absent: none), whatever the config now says.
    changed = [f"{k.removeprefix('rule.')} {had.get(k)} -> {wanted.get(k)}" for k in wanted
               if k != "rule.horizon" and had.get(k) != wanted.get(k)
               and not (k == "rule.futility" and k not in had)]  # fmt: skip
    if changed:
        raise UserError(f"study {cfg.study.name!r} was registered with another rule ({'; '.join(changed)}): "
                        "its looks were taken under that one; a new rule is a new study (study.name=...)")  # fmt: skip
    if cfg.study.max_seeds < int(had["rule.horizon"]):
        raise UserError(f"study {cfg.study.name!r} was registered with max_seeds={had['rule.horizon']}: "
                        "a maximum can grow, not shrink")  # fmt: skip


def clock(seconds: float) -> str:
    """Elapsed or remaining time as a study's progress lines print it: 4m05s, 1h02m."""
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )
