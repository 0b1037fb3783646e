"""The typed config schema, and `compose`: the one way any command loads a config.

The schema is registered in Hydra's ConfigStore, so a misspelt key fails at once. The YAML files
in the package's `conf/` (the repository's top-level `conf/` and `experiments/` link there) pick
values; every field and its default lives here, once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

from vgg_ablation.errors import UserError

CONF_DIR = Path(__file__).resolve().parent / "conf"  # inside the package: a wheel carries it
DEFAULT_STUDY = "sample"


@dataclass
class ModelConfig:
    width: float = 1.0  # multiplies every conv and hidden FC: 0.25 or 0.125 for CPU-sized studies
    batch_norm: bool = False  # the paper has none; BN is the modern variant
    head: str = "auto"  # paper (flatten, FC-4096 x2) | compact (avg-pool, 3 narrow FCs) | auto
    dropout: float = 0.5  # on the first two FCs, as in the paper
    init: str = "kaiming"  # kaiming | glorot | paper (N(0, 1e-2)) | from_A (section 3.1)
    # LRN's constants (k=2, alpha=1e-4) assume the activations that 0-255 inputs give. "paper"
    # makes LRN see activations of that size whatever the normalisation (see models.AlexNetLRN);
    # a number sets the factor by hand (1: LRN on the activations as they are).
    lrn_scale: Any = "paper"


SCHEDULES = ("plateau", "cosine", "step", "none")  # optim.schedule's choices (module.Classifier)


@dataclass
class OptimConfig:
    lr: float = 0.01  # the paper's initial learning rate
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "plateau"  # plateau (the paper's /10 on stalled val accuracy) | cosine | step
    plateau_patience: int = 2  # epochs without val-accuracy gain before lr /= 10
    step_every: int = 10  # epochs between /10 drops for schedule=step
    warmup_epochs: int = 0  # linear warm-up (helps deep nets without BN at higher lr)
    # A net's own learning rate, where it has one (a study's lr selection writes it: study.lr_grid);
    # the others train at lr. E.g. {A: 0.05, D: 0.025}
    lr_per_arch: dict[str, float] = field(default_factory=dict)


@dataclass
class DataConfig:
    name: str = "sample"  # sample | cifar10 | cifar100 | imagefolder | synthetic
    root: str | None = None  # the folder (imagefolder), or the one holding cifar-10-batches-py/ (cifar)
    batch_size: int = 128
    val_fraction: float = 0.1  # carved from the training split, deterministically; never from test
    test_fraction: float = 0.1  # a folder with train/ only: the share carved off as the test set
    # Sizes: None follows from the data (small images keep their size; >= 256 px gets S=Q=256, 224
    # crops, the paper's). Set any of them to override.
    input_size: int | None = None  # crop size fed to the net
    train_scale: int | None = None  # S: training images rescaled so their shorter side is S
    train_scale_max: int | None = None  # jitter S in [train_scale, train_scale_max] (section 3.1)
    test_scale: int | None = None  # Q: the test scale
    # standard: per-channel mean/std of the training split (what Kaiming init expects);
    # paper: mean RGB subtracted, 0-255 scale (section 3.1, the scale LRN's constants assume).
    normalize: str = "standard"
    in_memory: str = "auto"  # decode a folder once and hold it as tensors: auto (when it fits) | on | off
    augment: bool = True
    train_subset: int | None = None  # use only this many training images (a smaller budget)
    num_workers: int = 0  # DataLoader workers (file-backed data only)
    on_device: str = "auto"  # hold the whole dataset on the GPU: auto (when it fits) | on | off
    synthetic_size: int = 2048  # images per epoch for data=synthetic
    num_classes: int = 10  # synthetic only; other datasets read it from the data


@dataclass
class TrainerConfig:
    max_epochs: int = 10
    accelerator: str = "auto"  # a GPU when present, else CPU
    devices: Any = 1
    precision: str = "auto"  # auto: bf16-mixed on a GPU, 32-true on CPU
    limit_train_batches: Any = 1.0  # float fraction or int batches (tests use a few)
    limit_val_batches: Any = 1.0
    limit_test_batches: Any = 1.0
    deterministic: bool | None = None  # None: on for CPU (same seed, same metrics), off on a GPU
    # (cuDNN autotuning picks the fastest kernels, not always the same ones)
    compile: bool = False  # torch.compile the model (in place; worth it on a GPU)
    compile_backend: str = "inductor"  # torch.compile backend (tests use a cheap one: aot_eager)
    channels_last: str = "auto"  # auto: on for a GPU, and for a CPU cell on one thread | on | off
    progress_bar: bool = True
    threads: int | None = None  # CPU threads for torch; None leaves torch's choice
    # The test pass after training. Off for the cells that choose a study's lr or check its nets'
    # convergence: they read the validation split only, the test set is for the test cells.
    test: bool = True


@dataclass
class LoggerConfig:
    enabled: bool = True
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "vgg-ablation"  # a study uses its own name
    checkpoint_root: str = "checkpoints"  # <root>/<experiment>/<cell>/last.ckpt
    parent_run_id: str | None = None  # set by `vgg-ablation study`: the study's own MLflow run
    system_metrics: bool = True  # sample CPU, memory, disk, network (and GPU) into each run
    system_metrics_interval: float = 10.0  # seconds between samples
    ui_url: str = "http://127.0.0.1:5000"  # where `vgg-ablation ui` serves: reports link into it
    # How long the end of a run waits for a tracking store that stopped answering, before it keeps
    # the run's last records on disk (`vgg-ablation sync` sends them; so does a re-run of the cell).
    # Training itself never waits for the store.
    outage_wait: float = 300.0


@dataclass
class MarginsConfig:
    """Per claim, in points of top-1 error, fixed before the runs (the verdicts use them; they
    change no run). A 'better' claim ends *no relevant difference* when its interval lies inside
    +/-margin; a 'no better' claim is *supported* when the first net is not better by the margin.
    Wider margins decide with fewer seeds; these are the sizes below which a difference would not
    change what a practitioner builds."""

    # A-LRN vs A: the paper's "does not help" is a 0.1-point difference (Table 3); half a point is
    # about one standard error of a 10,000-image test error near 25% (0.43 points).
    lrn: float = 0.5
    # B vs A, D vs B: the paper's depth steps are 0.9 and 1.7 points; a step under 1 point is not
    # what the paper means by "error falls with depth".
    depth: float = 1.0
    saturation: float = 0.5  # E vs D: the paper's E is 0.3 points *worse* than D; as strict as LRN
    nonlinearity: float = 1.0  # C vs B: 0.6 points in the paper, the smallest gain it calls real
    context: float = 1.0  # D vs C: 1.1 points in the paper
    filters: float = 1.0  # B vs B-5x5: 7 points in the paper (sec. 4.1): 1 point is generous


@dataclass
class StudyConfig:
    name: str = "train"  # the study this run belongs to (MLflow experiment vgg-ablation/<name>)
    archs: list[str] = field(default_factory=lambda: ["A", "A-LRN", "B", "C", "D", "E"])
    # The seeds of the first look. A study with max_seeds unset has this one look; with max_seeds,
    # it runs until decided: after each look, the nets of every comparison still open get
    # seeds_per_look more seeds (the next ones after the largest), up to max_seeds per net.
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    max_seeds: int | None = None  # run until decided, up to this many seeds per net (None: one look)
    seeds_per_look: int = 3  # seeds added at each later look to the nets of an open comparison
    alpha: float = 0.05  # family-wise error: the chance that any verdict of the report is wrong
    margins: MarginsConfig = field(default_factory=MarginsConfig)
    # Planning only: the smallest gain worth detecting, in points, for sizing the next study (1
    # point: the size of the paper's depth steps, A->B 0.9, B->D 1.7 points).
    min_effect: float = 1.0
    # Claims tested beyond the defaults, by name (analysis.CLAIMS): "lrn-three-way" tests A-LRN vs A
    # in a design that ends whichever way (helps / no relevant difference / hurts) in place of the
    # non-superiority claim. Registered with the rule. []: the default claims.
    claims: list[str] = field(default_factory=list)
    # A fair learning rate per net: before the first look, each net trains once per lr here on
    # lr_seeds (cells of their own, validation only, never results), and its cells then use the lr
    # with the lowest mean validation error (recorded as optim.lr_per_arch). []: one lr for all.
    lr_grid: list[float] = field(default_factory=list)
    lr_seeds: list[int] = field(default_factory=lambda: [1000])
    # Convergence: with the first look, each net also trains convergence_seeds of the study's seeds
    # for convergence_epochs (validation only, never results); a net whose validation error falls by
    # less than convergence_tolerance points with the longer budget had converged at the study's.
    convergence_epochs: int | None = None
    convergence_seeds: int = 2
    convergence_tolerance: float = 0.5
    # Run until decided: after a look, a comparison whose chance of a verdict by max_seeds (at the
    # difference and spread seen so far, simulated under the rule) is below this stops as
    # "undecided: futile at this budget", and its nets get no more seeds for it. Registered with the
    # rule; non-binding, so the error rate holds (docs/statistics.md). 0: never.
    futility: float = 0.1
    # auto: on a CPU, a cell per core side by side, one thread each (Hydra's joblib launcher;
    # reports/bench-cpu-cells.md); off: one cell at a time on torch's threads. A launcher or a
    # thread count given explicitly wins either way.
    parallel: str = "auto"
    # Minutes of wall time after which the study starts no new cell (a cell already training
    # finishes) and writes its report with what it has; None: no limit.
    time_limit: float | None = None
    description: str = ""
    reports_dir: str = "reports"  # where its report, plots, runs CSV and archive go
    # What its report tells a reader to do when the study ends undecided (a study file's own advice,
    # e.g. the sample's: which study decides, what it costs, the command); "": worked out from the plans.
    next_step: str = ""


@dataclass
class BenchConfig:
    """`vgg-ablation bench`: how long to measure, and where the report goes (no run reads these)."""

    steps: int = 30  # timed training steps per measurement
    warmup: int = 5  # untimed steps before them
    rounds: int = 3  # interleaved rounds: the median is reported, a shared machine's drift cancels
    archs: list[str] | None = None  # the nets of the per-configuration table; None: the paper's six
    name: str = ""  # a suffix for the report's file name (reports/bench-<device>-<name>.md)
    folders: bool = False  # also measure the data paths (the sample as a folder; 224 px JPEGs)
    out: str = "reports"  # the folder the report goes to
    # steps: the training step alone (plain loop vs Lightning, per net); cells: whole cells of the
    # study the overrides name, profiled phase by phase, and the study run whole each way of
    # filling the machine (cells per hour; bench_cells.py)
    mode: str = "steps"
    epochs: int = 2  # cells: each cell shortened to this many epochs
    seeds: int = 2  # cells: seeds per net in each way's study
    ways: list[str] | None = None  # cells: the ways compared (bench_cells.WAYS); None: all
    profiles: bool = True  # cells: also profile each net's cells phase by phase (before the ways)


@dataclass
class ArchiveConfig:
    """A study's archive (`vgg-ablation export`, and the one a study writes beside its report at
    each look): where it goes and what it holds. No run reads these."""

    out: str = ""  # a .tar.gz, or a folder; empty: reports/<study>-archive.tar.gz, beside the report
    checkpoints: bool = False  # also unfinished cells' checkpoints (they resume mid-training elsewhere)
    system_metrics: bool = False  # also the runs' system/ metrics (CPU, memory, ...: most of a store's rows)
    # Rebuild the archive of a study whose store was lost from its report's runs CSV (and the
    # config and the data, which give the rest); the archive says what it lacks.
    from_csv: str = ""
    with_report: bool = True  # a study writes its archive beside its report, at every look


@dataclass
class Config:
    arch: str = "A"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    archive: ArchiveConfig = field(default_factory=ArchiveConfig)


# -- the options of the commands that are not a training config --------------------------------------
@dataclass
class SummaryOptions:
    """`vgg-ablation summary`: a net's per-layer table, the paper's geometry by default."""

    arch: str = "D"  # A, A-LRN, B, C, D, E, B-5x5, lenet, alexnet
    input_size: int | None = None  # None: the arch's own (224 for the VGGs, 28 LeNet, 227 AlexNet)
    num_classes: int | None = None  # None: the arch's own (1000; 10 for LeNet)
    width: float = 1.0  # multiplies every conv and hidden FC
    batch_norm: bool = False  # BatchNorm after every conv
    head: str = "auto"  # paper | compact | auto


@dataclass
class UiOptions:
    """`vgg-ablation ui`: where MLflow's dashboard listens (a study's overrides may follow)."""

    host: str = "127.0.0.1"  # 0.0.0.0 opens it to the network: every run readable by anyone there
    port: int = 5000


@dataclass
class ServerOptions:
    """`vgg-ablation server`: a lab's tracking server, PostgreSQL + MLflow, under one folder."""

    root: str = "lab-server"  # the database cluster, the artifacts, the logs and the credentials
    host: str = "127.0.0.1"  # the address MLflow listens on (0.0.0.0: every interface)
    port: int = 5000  # MLflow's port
    db_port: int = 5433  # PostgreSQL's port, on 127.0.0.1 only
    workers: int = 4  # MLflow server workers
    pool: int = 32  # database connections per worker: the writers it serves at once
    allowed_hosts: list[str] = field(default_factory=list)  # more names the server answers to
    # Seconds a checked login is trusted by each server worker (a password check costs ~0.1 s of
    # CPU): a changed password or a removed user is refused everywhere within this.
    login_cache: int = 60


@dataclass
class ServerUserOptions:
    """`vgg-ablation server-user`: a lab member's login on a running lab server."""

    name: str = ""  # the user to add
    root: str = "lab-server"  # the lab server's folder (its admin login is read from there)
    port: int = 5000  # the server's port on this machine
    url: str = ""  # or the server's address, when it is not this machine's port
    password: str = ""  # empty: one is generated and printed once
    study: str = ""  # a study to grant the user a permission on
    permission: str = "EDIT"  # READ | EDIT | MANAGE | NO_PERMISSIONS


@dataclass
class ImportOptions:
    """`vgg-ablation import ARCHIVE [ARCHIVE ...]`: a study's archive into a tracking store."""

    tracking_uri: str = ""  # the store to import into; empty: $MLFLOW_TRACKING_URI, else ./mlflow.db
    checkpoint_root: str = "checkpoints"  # where an unfinished cell's exported checkpoints go
    dry_run: bool = False  # say what would be added and skipped (or why refused); write nothing


def options(schema: type, args: list[str], command: str):
    """key=value arguments into a typed schema (OmegaConf: unknown keys and wrong types refused),
    every error one line."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, ValidationError

    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise UserError(f"{command}: expected key=value, got {arg!r}")
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(list(args)))
    except ConfigKeyError:
        keys = [f.name for f in dataclasses.fields(schema)]
        wrong = next(a.split("=", 1)[0] for a in args if a.split("=", 1)[0].split(".")[0] not in keys)
        raise UserError(f"{command} takes {', '.join(k + '=' for k in keys)}; got {wrong!r}") from None
    except ValidationError as exc:
        kind = {int: "a positive whole number", float: "a number", bool: "true or false"}
        field_type = {f.name: f.type for f in dataclasses.fields(schema)}.get(str(exc.key), "")
        wanted = next((w for t, w in kind.items() if t.__name__ in str(field_type)), "valid")
        value = dict(a.split("=", 1) for a in args).get(str(exc.key))
        raise UserError(f"{exc.key} must be {wanted}, got {value!r}") from None


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)


def compose(overrides: list[str], config_name: str = "train"):
    """Compose the config as Hydra will, turning Hydra's errors into one line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    register()
    given, overrides = overrides, with_study_dir(overrides)
    sweep_free = [
        o for o in overrides if o.startswith(SEARCHPATH) or not o.startswith(("hydra.", "hydra/", "--"))
    ]
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=sweep_free)
    except MissingConfigException as exc:
        raise UserError(_missing_choice(exc, given)) from None
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(one_line(exc)) from None


STUDY_DIR_ENV = "VGG_ABLATION_STUDY_DIR"  # a folder of the user's own studies, for every command
SEARCHPATH = "hydra.searchpath="


def study_dirs(overrides: list[str]) -> list[Path]:
    """The folders a study is looked for in: the package's, then the user's (study_dir=, or
    $VGG_ABLATION_STUDY_DIR)."""
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("study_dir=")]
    linked = [
        o[len(SEARCHPATH) :].strip("[]").removeprefix("file://")
        for o in overrides
        if o.startswith(SEARCHPATH)
    ]
    mine = (
        given[-1]
        if given
        else (str(Path(linked[-1]) / "experiment") if linked else os.environ.get(STUDY_DIR_ENV))
    )
    return [CONF_DIR / "experiment", *([Path(mine).expanduser().resolve()] if mine else [])]


def user_cache() -> Path:
    """This user's cache for the package (XDG's, ~/.cache/vgg-ablation by default): study-dir
    links and decoded images, nothing a result depends on; safe to delete."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vgg-ablation"


def with_study_dir(overrides: list[str]) -> list[str]:
    """`study_dir=DIR` (a folder of the user's own study files, DIR/<name>.yaml) as the Hydra
    search path that finds them: a root whose experiment/ is DIR (a link, kept in the user's
    cache). A study there overrides one of the package's with the same name."""
    dirs = study_dirs(overrides)
    rest = [o for o in overrides if not o.startswith("study_dir=")]
    if len(dirs) == 1 or any(o.startswith(SEARCHPATH) for o in rest):
        return rest
    mine = dirs[1]
    if not mine.is_dir():
        raise UserError(f"study_dir is not a folder: {mine}")
    root = user_cache() / "study-dirs" / hashlib.sha256(str(mine).encode()).hexdigest()[:16]
    link = root / "experiment"
    if not (link.is_symlink() and link.resolve() == mine):
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".experiment-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(mine, target_is_directory=True)
        os.replace(tmp, link)  # atomic: two commands at once both see a whole link
    return [*rest, f"{SEARCHPATH}[file://{root}]"]


def studies(overrides: list[str] | None = None) -> list[str]:
    """The studies a user can name with experiment=..., from every folder looked in."""
    return sorted({f.stem for d in study_dirs(overrides or []) for f in d.glob("*.yaml")})


def study_overrides(args: list[str]) -> list[str]:
    """A study's overrides: the user's, with the default study when none is named, and
    Lightning's per-epoch bars off (a study prints a line per cell; trainer.progress_bar=true,
    later on the line, wins)."""
    quiet = ["trainer.progress_bar=false"]
    experiment = [a for a in args if a.split("=", 1)[0].lstrip("+~") == "experiment"]
    if not experiment:
        return [f"experiment={DEFAULT_STUDY}", *quiet, *args]
    return [*experiment, *quiet, *[a for a in args if a not in experiment]]


def _missing_choice(exc: Exception, overrides: list[str]) -> str:
    text = str(exc)
    for group in sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir()):
        if f"'{group}/" in text:
            chosen = text.split(f"'{group}/", 1)[1].split("'", 1)[0]
            if group == "experiment":
                where = " and ".join(str(d) for d in study_dirs(overrides))
                return (f"unknown study {chosen!r}; choose one of: {', '.join(studies(overrides))} (looked in {where}; "
                        "your own: study_dir=<folder of NAME.yaml files>)")  # fmt: skip
            options = sorted(f.stem for f in (CONF_DIR / group).glob("*.yaml"))
            return f"unknown {group} {chosen!r}; choose one of: {', '.join(options)}"
    return one_line(exc)


def one_line(exc: BaseException) -> str:
    """An exception (and its cause) as one line for an `error:` message."""
    parts = [str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__]
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        parts.append(str(cause).strip().splitlines()[0])
    return " ".join(parts)
