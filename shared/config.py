"""Study and site files: parsed once at the edge into typed, validated dataclasses.

A *study* file belongs to the consortium admin (task, model, strategy, rounds,
which sites take part). A *site* file belongs to a hospital's IT team and is the
only place that knows where the data lives and what its columns mean. Unknown
keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import ConfigError

TASKS = ("binary", "regression", "survival", "multitask")
MODELS = ("logistic", "mlp", "cox", "hazard", "gnn")
ACCOUNTANTS = ("rdp", "prv")
DP_LEVELS = ("record", "site")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "median", "trimmed_mean", "krum")
# Strategies that need every site's individual update, which secure aggregation hides from the server.
ROBUST_STRATEGIES = ("median", "trimmed_mean", "krum")
OPTIMIZERS = ("sgd", "adam")
MISSING = ("drop", "mean", "none")
NORMALIZE = ("site", "federated", "none")
FORMATS = ("table", "smiles")  # smiles: one molecule per row, featurised into a graph at the site
INVALID_SMILES = ("error", "skip")
CONVS = ("graphconv", "gin")
POOLINGS = ("mean", "add")
PERSONALIZATION = ("finetune", "fedbn", "ditto", "fenda")
# Methods that change the model's architecture (norm layers, a local extractor): tabular MLPs only.
PERSONAL_ARCHITECTURES = ("fedbn", "fenda")
# Which model names make sense for which task.
MODELS_FOR_TASK = {
    "binary": ("logistic", "mlp", "gnn"),
    "regression": ("mlp", "gnn"),
    "survival": ("cox", "mlp", "hazard"),
    "multitask": ("gnn",),
}
# Models that read molecular graphs (site data with format = "smiles").
GRAPH_MODELS = ("gnn",)
# Survival models whose loss is a sum of per-patient terms, so per-sample clipping bounds
# one patient's influence. The Cox partial likelihood couples a batch through the risk set.
DP_SURVIVAL_MODELS = ("hazard",)


@dataclass(frozen=True)
class ModelOptions:
    """Architecture knobs for the model zoo (ignored by the linear models)."""

    hidden: tuple[int, ...] = (64, 32)
    dropout: float = 0.0
    time_bins: tuple[float, ...] = ()  # cut points of the discrete-time hazard model
    # Graph neural network (model = "gnn"): message-passing layers of width hidden[0]
    # (or one width per layer), then a graph-level pooling and one linear output per task.
    layers: int = 3
    conv: str = "graphconv"
    pooling: str = "mean"
    max_atoms: int = 128  # public cap on molecule size for per-molecule DP (dense padded graphs)


@dataclass(frozen=True)
class PrivacyConfig:
    """The study's differential-privacy plan (local DP-SGD at every site)."""

    dp: bool = False
    target_epsilon: float = 8.0  # per site, for the whole study
    delta: float = 1e-5  # default; a site's own [privacy] delta wins
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    reproducible_noise: bool = False  # tests only: seed the DP noise from the study seed
    level: str = "record"  # record: DP-SGD at each site (protects a patient); site: central DP (protects a site)
    site_clipping_norm: float = 1.0  # level = "site": L2 bound of each site's whole update
    # Whether sites answer evaluations. Metrics are not covered by epsilon (they are bounded by the
    # schedule and the minimum test size); false: no site evaluates, the report has no per-round metrics.
    evaluation: bool = True


@dataclass(frozen=True)
class SecureAggregationConfig:
    """SecAgg+ settings the admin chooses; the protocol's own parameters are derived from them."""

    enabled: bool = True
    max_dropouts: int = 0  # sites that may fail mid-round without halting it
    update_bound: float | None = None  # per-coordinate bound on a site's delta; None = derived
    timeout_s: float = 600.0  # per protocol stage; a silent site cannot stall the study forever
    stats_bound: float = 1e4  # bound on per-feature means and mean squares sent in the statistics round


@dataclass(frozen=True)
class RobustnessConfig:
    """Server-side defences that need individual updates (secure aggregation off)."""

    max_update_norm: float | None = None  # L2 bound on a site's delta; larger updates are rejected
    trim_fraction: float = 0.2  # trimmed_mean: fraction cut at each end, per coordinate
    byzantine_sites: int = 0  # krum: number of sites assumed malicious


@dataclass(frozen=True)
class SitePrivacy:
    """The site's own privacy governance: its ledger and the budget it must never exceed."""

    ledger: Path
    epsilon_budget: float
    delta: float  # the site's delta: its ledger is accounted at this value, whatever a study asks
    allow_site_level: bool = False  # accept site-level DP, where the coordinator adds the noise
    ledger_key: Path | None = None  # the ledger's HMAC key file; None = LEDGER.key beside the ledger


@dataclass(frozen=True)
class PersonalizationConfig:
    """The study's ``[personalization]``: a per-site model beside the global one; its parts never leave the site.

    finetune: k steps of the global model on the site's train split at evaluation; fedbn:
    site-local BatchNorm layers; ditto: a personal model with a proximal term (lambda/2)
    to each round's global model; fenda: a local feature extractor and head beside the
    federated extractor.
    """

    method: str
    steps: int = 50  # finetune: steps of local fine-tuning before each evaluation
    lam: float = 0.1  # ditto: weight of the proximal term lambda/2 * ||w_personal - w_global||^2


@dataclass(frozen=True)
class SiteRef:
    """A site taking part in a study, and where its site file is (for simulation)."""

    name: str
    config: Path


@dataclass(frozen=True)
class StudyConfig:
    """Everything the coordinator decides about a federated study."""

    name: str
    task: str
    model: str
    rounds: int
    strategy: str
    local_steps: int
    batch_size: int
    learning_rate: float
    server_learning_rate: float
    proximal_mu: float
    seed: int
    sites: tuple[SiteRef, ...]
    optimizer: str = "sgd"
    min_sites: int = 0  # 0 = every listed site must answer each round
    round_timeout_s: float | None = None  # a site that has not answered by then is dropped from the round
    model_options: ModelOptions = field(default_factory=ModelOptions)
    categories: dict[str, tuple[str, ...]] = field(default_factory=dict)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secure: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    path: Path | None = None
    omics: OmicsSelection | None = None  # federated feature selection (study [omics] section)
    # Imbalance and scale (binary/multitask): pos_weight of BCE ("balanced" = pooled negatives/positives
    # per task, or one number), local work in epochs of the site's own train split (0 = local_steps),
    # the output bias set at the pooled training log-odds, best-round selection on a validation split.
    pos_weight: str | float | None = None
    local_epochs: float = 0.0
    init_output_bias: bool = True
    select_best: bool = False
    validation_fraction: float = 0.15
    personalization: PersonalizationConfig | None = None  # study [personalization]: per-site models

    @property
    def required_sites(self) -> int:
        """Sites that must answer for a round to count (all, less the tolerated dropouts)."""
        if self.min_sites:
            return self.min_sites
        dropouts = self.secure.max_dropouts if self.secure.enabled else 0
        return len(self.sites) - dropouts

    @property
    def update_bound(self) -> float:
        """Per-coordinate bound every site clips its delta to under secure aggregation.

        Under DP-SGD the clipped, un-noised part of a round's update has L2 norm at
        most lr x local_steps x max_grad_norm, which bounds every coordinate too.
        """
        if self.secure.update_bound is not None:
            return self.secure.update_bound
        if self.privacy.dp and self.privacy.level == "site":
            return self.privacy.site_clipping_norm  # an L2 bound bounds every coordinate
        if self.privacy.dp and self.optimizer == "adam":
            # An Adam step moves a coordinate by at most lr (1 - b1) / sqrt(1 - b2) ~ 3.17 lr (torch defaults).
            return self.learning_rate * self.local_steps * 0.1 / (0.001**0.5)
        if self.privacy.dp:
            return self.learning_rate * self.local_steps * self.privacy.max_grad_norm
        return 1.0


@dataclass(frozen=True)
class DataSpec:
    """How one site's table maps onto the study's task."""

    path: Path
    label: str
    time: str | None = None
    labels: tuple[str, ...] = ()  # every label column (several for task = "multitask"); label is the first
    format: str = "table"
    smiles: str = "smiles"  # format = "smiles": the column holding one SMILES string per molecule
    invalid_smiles: str = "error"  # a SMILES RDKit cannot parse: stop ("error") or skip the row, counted
    features: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    missing: str = "drop"
    normalize: str = "site"
    test_fraction: float = 0.2
    split_column: str | None = None
    split_seed: int = 42
    # Several tables per patient (omics), joined on the patient id before anything else.
    id: str | None = None
    join: str = "inner"
    tables: tuple[TableSpec, ...] = ()


@dataclass(frozen=True)
class SiteConfig:
    """A hospital's description of its own data."""

    name: str
    data: DataSpec
    path: Path | None = None
    privacy: SitePrivacy | None = None


# --------------------------------------------------------------------------- helpers


class _Section:
    """Typed reads from one TOML table, with errors that name the file and key."""

    def __init__(self, table: Any, where: str, source: str) -> None:
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{where}] must be a table")
        self._t = dict(table)
        self._where = where
        self._source = source
        self._seen: set[str] = set()

    def _err(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self._source}: [{self._where}] {key}: {problem}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., *, choices: tuple[str, ...] = ()) -> Any:
        self._seen.add(key)
        if key not in self._t:
            if default is ...:
                raise self._err(key, "is required")
            return default
        value = self._t[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds:
            raise self._err(key, f"expected {'/'.join(k.__name__ for k in kinds)}, got {value!r}")
        if not isinstance(value, kinds):
            raise self._err(key, f"expected {'/'.join(k.__name__ for k in kinds)}, got {value!r}")
        if choices and value not in choices:
            raise self._err(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def strings(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.get(key, list, list(default))
        if not all(isinstance(v, str) for v in value):
            raise self._err(key, "must be a list of strings")
        return tuple(value)

    def positive(self, key: str, kind: type, default: Any = ...) -> Any:
        value = self.get(key, kind, default)
        if value is None and default is None:
            return None
        if not value > 0:  # also rejects NaN
            raise self._err(key, f"must be > 0, got {value}")
        return value

    def done(self) -> None:
        unknown = sorted(set(self._t) - self._seen)
        if unknown:
            raise ConfigError(f"{self._source}: [{self._where}] unknown key(s) {', '.join(unknown)} (check the spelling)")


def _read_toml(path: Path, kind: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{kind} file {path} not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{kind} file {path} is not valid TOML: {err}") from None


def _unknown_tables(doc: dict[str, Any], allowed: set[str], source: str) -> None:
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


# --------------------------------------------------------------------------- study


def parse_study(doc: dict[str, Any], source: str = "study", base_dir: Path | None = None) -> StudyConfig:
    """Validate a parsed study document; relative site paths resolve against ``base_dir``."""
    _unknown_tables(doc, {"study", "sites", "model", "data", "privacy", "secure_aggregation", "robustness", "omics", "personalization"}, source)
    if "study" not in doc:
        raise ConfigError(f"{source}: the [study] section is missing")
    s = _Section(doc.get("study"), "study", source)
    name = s.get("name", str)
    task = s.get("task", str, choices=TASKS)
    model = s.get("model", str, choices=MODELS)
    if model not in MODELS_FOR_TASK[task]:
        raise ConfigError(
            f"{source}: [study] model '{model}' does not fit task '{task}'; use one of {', '.join(MODELS_FOR_TASK[task])}"
        )
    study = dict(
        name=name,
        task=task,
        model=model,
        rounds=s.positive("rounds", int, 5),
        strategy=s.get("strategy", str, "fedavg", choices=STRATEGIES),
        local_steps=s.positive("local_steps", int, 100),
        batch_size=s.positive("batch_size", int, 32),
        learning_rate=s.positive("learning_rate", float, 0.01),
        server_learning_rate=s.positive("server_learning_rate", float, 0.1),
        proximal_mu=s.get("proximal_mu", float, 0.0),
        seed=s.get("seed", int, 42),
        optimizer=s.get("optimizer", str, "sgd", choices=OPTIMIZERS),
        min_sites=s.get("min_sites", int, 0),
        round_timeout_s=s.positive("round_timeout_s", float, None),
    )
    secure_enabled = s.get("secure_aggregation", bool, True)
    study.update(_imbalance_options(s, task, source))
    if study["proximal_mu"] < 0:
        raise ConfigError(f"{source}: [study] proximal_mu must be >= 0")
    s.done()

    m = _Section(doc.get("model", {}), "model", source)
    hidden = m.get("hidden", (list, int), [64] if model == "gnn" else [64, 32])
    hidden = [hidden] if isinstance(hidden, int) else hidden
    if not hidden or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden):
        raise ConfigError(f"{source}: [model] hidden must be a non-empty list of positive integers")
    dropout = m.get("dropout", float, 0.0)
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"{source}: [model] dropout must be in [0, 1)")
    bins = m.get("time_bins", list, [])
    if not all(isinstance(b, (int, float)) and not isinstance(b, bool) and b > 0 for b in bins) or sorted(set(bins)) != bins:
        raise ConfigError(f"{source}: [model] time_bins must be increasing positive cut points (e.g. days)")
    layers = m.positive("layers", int, 3)
    conv = m.get("conv", str, "graphconv", choices=CONVS)
    pooling = m.get("pooling", str, "mean", choices=POOLINGS)
    max_atoms = m.positive("max_atoms", int, 128)
    m.done()
    if model == "gnn" and len(hidden) not in (1, layers):
        raise ConfigError(f"{source}: [model] hidden for model 'gnn' is one width or one width per layer ({layers} layers), got {hidden}")
    if model == "hazard" and not bins:
        raise ConfigError(f"{source}: model 'hazard' needs [model] time_bins, the cut points of its time intervals (e.g. [365, 730, 1825])")

    p = _Section(doc.get("privacy", {}), "privacy", source)
    privacy = PrivacyConfig(
        dp=p.get("dp", bool, False),
        target_epsilon=p.positive("target_epsilon", float, 8.0),
        delta=p.positive("delta", float, 1e-5),
        max_grad_norm=p.positive("max_grad_norm", float, 1.0),
        accountant=p.get("accountant", str, "rdp", choices=ACCOUNTANTS),
        reproducible_noise=p.get("reproducible_noise", bool, False),
        level=p.get("level", str, "record", choices=DP_LEVELS),
        site_clipping_norm=p.positive("site_clipping_norm", float, 1.0),
        evaluation=p.get("evaluation", bool, True),
    )
    p.done()
    a = _Section(doc.get("secure_aggregation", {}), "secure_aggregation", source)
    bound = a.get("update_bound", float, None)
    secure = SecureAggregationConfig(
        enabled=secure_enabled,
        max_dropouts=a.get("max_dropouts", int, 0),
        update_bound=bound,
        timeout_s=a.positive("timeout_s", float, 600.0),
        stats_bound=a.positive("stats_bound", float, 1e4),
    )
    a.done()
    if bound is not None and bound <= 0:
        raise ConfigError(f"{source}: [secure_aggregation] update_bound must be > 0")
    if secure.max_dropouts < 0:
        raise ConfigError(f"{source}: [secure_aggregation] max_dropouts must be >= 0")
    if privacy.delta >= 1:
        raise ConfigError(f"{source}: [privacy] delta must be < 1 (typically below 1/n_train)")
    if privacy.dp and privacy.level == "site" and study["strategy"] != "fedavg":
        raise ConfigError(
            f"{source}: [privacy] level = \"site\" needs strategy = \"fedavg\": Flower's central-DP wrapper adds "
            "its noise to the averaged model, which an adaptive server optimiser would rescale"
        )
    if privacy.dp and privacy.level == "record" and study["strategy"] == "fedprox" and study["proximal_mu"] > 0:
        raise ConfigError(f"{source}: FedProx's proximal term is not supported under DP-SGD; use strategy = \"fedavg\" or proximal_mu = 0")
    if privacy.dp and privacy.level == "site" and not secure_enabled:
        raise ConfigError(
            f"{source}: [privacy] level = \"site\" needs secure aggregation: sites add no noise themselves, so without "
            "it the coordinator would see each site's un-noised update"
        )
    if privacy.dp and privacy.level == "record" and task == "survival" and model not in DP_SURVIVAL_MODELS:
        raise ConfigError(
            f"{source}: model '{model}' cannot be trained with dp = true: the Cox partial likelihood couples every "
            "patient of a batch through the risk set, so per-sample clipping does not bound one patient's influence; "
            'use model = "hazard" (discrete-time logistic hazard, a sum of per-patient terms)'
        )

    r = _Section(doc.get("robustness", {}), "robustness", source)
    robustness = RobustnessConfig(
        max_update_norm=r.positive("max_update_norm", float, None),
        trim_fraction=r.get("trim_fraction", float, 0.2),
        byzantine_sites=r.get("byzantine_sites", int, 0),
    )
    r.done()
    if not 0.0 <= robustness.trim_fraction < 0.5:
        raise ConfigError(f"{source}: [robustness] trim_fraction must be in [0, 0.5), got {robustness.trim_fraction}")
    if robustness.byzantine_sites < 0:
        raise ConfigError(f"{source}: [robustness] byzantine_sites must be >= 0")
    if secure_enabled and study["strategy"] in ROBUST_STRATEGIES:
        raise ConfigError(
            f"{source}: strategy \"{study['strategy']}\" cannot run with secure aggregation: under SecAgg+ the server "
            "only ever sees the sum of the sites' updates, never one site's update, so it cannot take a median, trim "
            "or compare updates; set [study] secure_aggregation = false or use a mean-based strategy"
        )
    if secure_enabled and robustness.max_update_norm is not None:
        raise ConfigError(
            f"{source}: [robustness] max_update_norm needs secure aggregation off (the server cannot see one site's "
            "norm under SecAgg+); with secure aggregation each site clips its own update to [secure_aggregation] update_bound"
        )

    d = _Section(doc.get("data", {}), "data", source)
    raw_categories = d.get("categories", dict, {})
    d.done()
    categories: dict[str, tuple[str, ...]] = {}
    for column, levels in raw_categories.items():
        if not isinstance(levels, list) or not levels or len(set(map(str, levels))) != len(levels):
            raise ConfigError(f"{source}: [data.categories] {column} must be a non-empty list of distinct values")
        categories[column] = tuple(str(v) for v in levels)

    raw_sites = doc.get("sites", [])
    if not isinstance(raw_sites, list) or not raw_sites:
        raise ConfigError(f"{source}: list at least one site as [[sites]] with name and config")
    sites: list[SiteRef] = []
    for i, raw in enumerate(raw_sites):
        t = _Section(raw, f"sites #{i + 1}", source)
        site_name = t.get("name", str)
        config = Path(t.get("config", str))
        t.done()
        if base_dir is not None and not config.is_absolute():
            config = (base_dir / config).resolve()
        sites.append(SiteRef(site_name, config))
    names = [site.name for site in sites]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{source}: duplicate site name(s) {', '.join(duplicates)}; every site needs its own name")
    if study["min_sites"] < 0 or study["min_sites"] > len(sites):
        raise ConfigError(f"{source}: [study] min_sites must be between 0 and the {len(sites)} listed sites")
    if secure.enabled and study["min_sites"] and study["min_sites"] < len(sites) - secure.max_dropouts:
        missing = len(sites) - study["min_sites"]
        raise ConfigError(
            f"{source}: [study] min_sites = {study['min_sites']} lets a round go on without {missing} site(s), but under secure "
            f"aggregation every site refuses to unmask more than [secure_aggregation] max_dropouts = {secure.max_dropouts} "
            f"dropped sites; set max_dropouts = {missing} (or raise min_sites)"
        )
    _check_imbalance(study, secure_enabled, privacy, source)
    if "omics" in doc and not secure_enabled:
        raise ConfigError(f"{source}: [omics] feature selection needs secure_aggregation = true: without it the coordinator would see each site's per-feature statistics")
    return StudyConfig(
        **study,
        sites=tuple(sites),
        model_options=ModelOptions(tuple(hidden), dropout, tuple(float(b) for b in bins), layers, conv, pooling, max_atoms),
        categories=categories,
        privacy=privacy,
        secure=secure,
        robustness=robustness,
        omics=_parse_omics(doc["omics"], source) if "omics" in doc else None,
        personalization=_parse_personalization(doc["personalization"], source, model, privacy.dp) if "personalization" in doc else None,
    )


def _imbalance_options(s: _Section, task: str, source: str) -> dict[str, Any]:
    """[study] pos_weight, local_epochs, init_output_bias, select_best, validation_fraction."""
    pos_weight = s.get("pos_weight", (str, float), None)
    if isinstance(pos_weight, str) and pos_weight != "balanced":
        raise ConfigError(f'{source}: [study] pos_weight must be "balanced" or a positive number, got {pos_weight!r}')
    if isinstance(pos_weight, float) and not 0 < pos_weight < 1e6:
        raise ConfigError(f"{source}: [study] pos_weight must be a positive number below 1e6, got {pos_weight}")
    if pos_weight is not None and task not in ("binary", "multitask"):
        raise ConfigError(f"{source}: [study] pos_weight applies to binary and multitask studies only, not {task}")
    options = dict(
        pos_weight=pos_weight,
        local_epochs=s.get("local_epochs", float, 0.0),
        init_output_bias=s.get("init_output_bias", bool, True),
        select_best=s.get("select_best", bool, False),
        validation_fraction=s.get("validation_fraction", float, 0.15),
    )
    if not 0 <= options["local_epochs"] <= 1000:
        raise ConfigError(f"{source}: [study] local_epochs must be between 0 (use local_steps) and 1000")
    if not 0 < options["validation_fraction"] < 0.5:
        raise ConfigError(f"{source}: [study] validation_fraction must be in (0, 0.5)")
    return options


def _check_imbalance(study: dict[str, Any], secure_enabled: bool, privacy: PrivacyConfig, source: str) -> None:
    if study["pos_weight"] == "balanced" and not secure_enabled:
        raise ConfigError(f'{source}: [study] pos_weight = "balanced" needs secure aggregation: the pooled label counts travel through the secure sum, never one site\'s')
    if study["local_epochs"] and privacy.dp:
        raise ConfigError(f"{source}: [study] local_epochs cannot be used with dp = true (the DP update bound and noise are set from local_steps); give local_steps")
    if study["select_best"] and not privacy.evaluation:
        raise ConfigError(f"{source}: [study] select_best needs [privacy] evaluation = true: the best round is chosen on the sites' validation metrics")


def load_study(path: str | Path) -> StudyConfig:
    """Read and validate a study file."""
    path = Path(path).resolve()
    study = parse_study(_read_toml(path, "study"), source=str(path), base_dir=path.parent)
    return StudyConfig(**{**study.__dict__, "path": path})


# --------------------------------------------------------------------------- site


def parse_site(doc: dict[str, Any], source: str = "site", base_dir: Path | None = None) -> SiteConfig:
    """Validate a parsed site document; the data path resolves against ``base_dir``."""
    _unknown_tables(doc, {"site", "data", "privacy", "tables"}, source)
    if "site" not in doc:
        raise ConfigError(f"{source}: the [site] section is missing")
    if "data" not in doc:
        raise ConfigError(f"{source}: the [data] section is missing")
    s = _Section(doc["site"], "site", source)
    name = s.get("name", str)
    s.done()
    d = _Section(doc["data"], "data", source)
    tables = _parse_tables(doc["tables"], source, base_dir) if "tables" in doc else ()
    if tables and "path" in doc["data"]:
        raise ConfigError(f"{source}: use either [data] path (one table) or [[tables]] (several), not both")
    data_path = tables[0].path if tables else Path(d.get("path", str))
    if base_dir is not None and not data_path.is_absolute():
        data_path = (base_dir / data_path).resolve()
    raw_label = d.get("label", (str, list))
    labels = (raw_label,) if isinstance(raw_label, str) else tuple(raw_label)
    if not labels or not all(isinstance(v, str) and v for v in labels) or len(set(labels)) != len(labels):
        raise ConfigError(f"{source}: [data] label must be a column name or a list of distinct column names")
    spec = DataSpec(
        path=data_path,
        label=labels[0],
        labels=labels,
        format=d.get("format", str, "table", choices=FORMATS),
        smiles=d.get("smiles", str, "smiles"),
        invalid_smiles=d.get("invalid_smiles", str, "error", choices=INVALID_SMILES),
        time=d.get("time", str, None),
        features=d.strings("features"),
        categorical=d.strings("categorical"),
        drop=d.strings("drop"),
        missing=d.get("missing", str, "drop", choices=MISSING),
        normalize=d.get("normalize", str, "site", choices=NORMALIZE),
        test_fraction=d.get("test_fraction", float, 0.2),
        split_column=d.get("split_column", str, None),
        split_seed=d.get("split_seed", int, 42),
        id=d.get("id", str, None),
        join=d.get("join", str, "inner", choices=JOINS),
        tables=tables,
    )
    d.done()
    _check_table_ids(spec, source)
    if spec.split_column is None and not 0.0 < spec.test_fraction < 1.0:
        raise ConfigError(f"{source}: [data] test_fraction must be between 0 and 1 (exclusive)")
    privacy = None
    if "privacy" in doc:
        p = _Section(doc["privacy"], "privacy", source)
        ledger = Path(p.get("ledger", str, f"{name}.ledger.sqlite"))
        if base_dir is not None and not ledger.is_absolute():
            ledger = (base_dir / ledger).resolve()
        ledger_key = p.get("ledger_key", str, None)
        key = None if ledger_key is None else Path(ledger_key)
        if key is not None and base_dir is not None and not key.is_absolute():
            key = (base_dir / key).resolve()
        privacy = SitePrivacy(
            ledger=ledger,
            epsilon_budget=p.positive("epsilon_budget", float),
            delta=p.positive("delta", float),
            allow_site_level=p.get("allow_site_level", bool, False),
            ledger_key=key,
        )
        p.done()
        if not privacy.delta < 1:
            raise ConfigError(f"{source}: [privacy] delta must be between 0 and 1")
    return SiteConfig(name=name, data=spec, privacy=privacy)


def load_site(path: str | Path) -> SiteConfig:
    """Read and validate a site file."""
    path = Path(path).resolve()
    site = parse_site(_read_toml(path, "site"), source=str(path), base_dir=path.parent)
    return SiteConfig(name=site.name, data=site.data, path=path, privacy=site.privacy)


def load_site_ref(ref: SiteRef, study_path: Path | None = None) -> SiteConfig:
    """The site file a study lists, checked to describe the site the study names."""
    site = load_site(ref.config)
    if site.name != ref.name:
        raise ConfigError(f"{study_path or 'study'}: site '{ref.name}' points at {ref.config}, whose [site] name is '{site.name}'")
    return site


def check_format(site: SiteConfig, model: str) -> None:
    """Graph models read SMILES sites and only they do: say so before loading anything."""
    graph_model = model in GRAPH_MODELS
    if graph_model and site.data.format != "smiles":
        raise ConfigError(f"site '{site.name}': the study's model '{model}' reads molecules; set [data] format = \"smiles\" in {site.path}")
    if not graph_model and site.data.format == "smiles":
        raise ConfigError(f"site '{site.name}': {site.path} holds molecules (format = \"smiles\"), which only model = \"gnn\" can learn from")


# --------------------------------------------------------------------------- omics: several tables, feature selection

JOINS = ("inner", "left")
ORIENTATIONS = ("samples_by_genes", "genes_by_samples")
OMICS_TRANSFORMS = ("cpm", "log1p")
CLINICAL_ROLE = "clinical"  # every other role (expression, mutation, ...) is omics: a candidate for feature selection


@dataclass(frozen=True)
class TableSpec:
    """One of a site's tables (site file ``[[tables]]``): where it is and how it joins on the patient id."""

    path: Path
    role: str = CLINICAL_ROLE
    id: str | None = None  # id column of this table; None = [data] id (AnnData: the obs names)
    orientation: str = "samples_by_genes"  # genes_by_samples: one row per gene, one column per patient
    transforms: tuple[str, ...] = ()  # applied in order, per patient: cpm, log1p
    drop: tuple[str, ...] = ()  # columns of this table never used
    prefix: str = ""  # prepended to this table's column names (to resolve clashes)
    obs: tuple[str, ...] | None = None  # AnnData: obs columns to bring in as clinical variables (None = all)

    @property
    def is_omics(self) -> bool:
        return self.role != CLINICAL_ROLE


@dataclass(frozen=True)
class OmicsSelection:
    """Federated feature selection (study ``[omics]``): rules applied to pooled per-feature statistics."""

    max_missing_rate: float = 1.0  # drop a feature missing in more than this fraction of train patients (pooled)
    min_variance: float = 0.0  # drop a feature whose pooled variance is at or below this
    top_k: int = 0  # then keep the k most variable (0 = every feature that passed)
    features: tuple[str, ...] = ()  # the study's order of omics features (and the only candidates); empty = by name


def _parse_tables(raw: Any, source: str, base_dir: Path | None) -> tuple[TableSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{source}: [[tables]] must list at least one table with path and role")
    tables = []
    for i, entry in enumerate(raw):
        t = _Section(entry, f"tables #{i + 1}", source)
        path = Path(t.get("path", str))
        if base_dir is not None and not path.is_absolute():
            path = (base_dir / path).resolve()
        obs = t.get("obs", list, None)
        if obs is not None:
            if not all(isinstance(v, str) for v in obs):
                raise ConfigError(f"{source}: [tables #{i + 1}] obs must be a list of strings")
            obs = tuple(obs)
        table = TableSpec(
            path=path,
            role=t.get("role", str, CLINICAL_ROLE),
            id=t.get("id", str, None),
            orientation=t.get("orientation", str, "samples_by_genes", choices=ORIENTATIONS),
            transforms=t.strings("transforms"),
            drop=t.strings("drop"),
            prefix=t.get("prefix", str, ""),
            obs=obs,
        )
        t.done()
        bad = [x for x in table.transforms if x not in OMICS_TRANSFORMS]
        if bad:
            raise ConfigError(f"{source}: [tables #{i + 1}] transforms: unknown {bad[0]!r}; use {', '.join(OMICS_TRANSFORMS)}")
        if table.transforms and not table.is_omics:
            raise ConfigError(f"{source}: [tables #{i + 1}] transforms apply to omics tables only; set role (e.g. \"expression\")")
        if not table.role.strip():
            raise ConfigError(f"{source}: [tables #{i + 1}] role must not be empty")
        if obs is not None and path.suffix.lower() != ".h5ad":
            raise ConfigError(f"{source}: [tables #{i + 1}] obs applies to AnnData (.h5ad) tables only")
        tables.append(table)
    paths = [t.path for t in tables]
    if len(set(paths)) != len(paths):
        raise ConfigError(f"{source}: [[tables]] lists the same file twice")
    return tuple(tables)


def _check_table_ids(spec: DataSpec, source: str) -> None:
    """Every table of several needs an id column (its own, [data] id, or an AnnData's obs names)."""
    for i, table in enumerate(spec.tables):
        if table.path.suffix.lower() != ".h5ad" and table.id is None and spec.id is None and len(spec.tables) > 1:
            raise ConfigError(f"{source}: [tables #{i + 1}] has no id column; set [data] id = \"...\" or id in the table")
        if table.orientation == "genes_by_samples" and table.path.suffix.lower() == ".h5ad":
            raise ConfigError(f"{source}: [tables #{i + 1}] AnnData files are samples x genes; drop orientation")


def _parse_personalization(raw: Any, source: str, model: str, dp: bool) -> PersonalizationConfig:
    """``[personalization]``: refused under DP, where the personal training would spend budget no ledger records."""
    p = _Section(raw, "personalization", source)
    config = PersonalizationConfig(
        method=p.get("method", str, choices=PERSONALIZATION),
        steps=p.positive("steps", int, 50),
        lam=p.get("lambda", float, 0.1),
    )
    p.done()
    if config.lam < 0:
        raise ConfigError(f"{source}: [personalization] lambda must be >= 0")
    if dp:
        raise ConfigError(
            f"{source}: [personalization] is not available with [privacy] dp = true: personal training reads the private "
            "rows outside the DP-SGD steps the ledger accounts; remove one of the two sections"
        )
    if config.method in PERSONAL_ARCHITECTURES and model != "mlp":
        raise ConfigError(f"{source}: [personalization] method '{config.method}' needs [study] model = \"mlp\" (it adds layers to the MLP), not '{model}'")
    return config


def _parse_omics(raw: Any, source: str) -> OmicsSelection:
    o = _Section(raw, "omics", source)
    selection = OmicsSelection(
        max_missing_rate=o.get("max_missing_rate", float, 1.0),
        min_variance=o.get("min_variance", float, 0.0),
        top_k=o.get("top_k", int, 0),
        features=o.strings("features"),
    )
    o.done()
    if not 0.0 <= selection.max_missing_rate <= 1.0:
        raise ConfigError(f"{source}: [omics] max_missing_rate must be between 0 and 1")
    if selection.min_variance < 0 or selection.top_k < 0:
        raise ConfigError(f"{source}: [omics] min_variance and top_k must be >= 0")
    if len(set(selection.features)) != len(selection.features):
        raise ConfigError(f"{source}: [omics] features lists a feature twice")
    return selection
