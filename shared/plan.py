"""The training plan: what the coordinator tells every site about the study.

The server sends it with each instruction as one JSON string, so a deployed
site needs only its own site file; everything about *how* to train comes from
the study and is identical at every site.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from shared.config import ModelOptions, PersonalizationConfig, PrivacyConfig, StudyConfig

PLAN_KEY = "fedhelix.plan"
ROUND_KEY = "fedhelix.round"
STAGE_KEY = "fedhelix.stage"  # "stats" / "select" / "labels" for the secure statistics rounds, absent for training


@dataclass(frozen=True)
class TrainingPlan:
    study: str
    task: str
    model: str
    local_steps: int
    batch_size: int
    learning_rate: float
    optimizer: str
    proximal_mu: float
    seed: int
    model_options: ModelOptions = field(default_factory=ModelOptions)
    categories: dict[str, list[str]] = field(default_factory=dict)
    features: list[str] = field(default_factory=list)  # agreed encoded feature order
    labels: list[str] = field(default_factory=list)  # agreed label columns (one output per label for multitask)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    rounds: int = 1  # planned rounds: DP noise is calibrated for rounds x local_steps
    secure_aggregation: bool = False
    update_bound: float = 1.0  # per-coordinate clip of the delta before secure aggregation
    stats_bound: float = 1e4  # clip of the values a site sends in the statistics round
    # Pooled standardisation from the secure statistics round (normalize = "federated"):
    # per agreed feature, the mean and scale every site uses.
    normalization: dict[str, list[float]] = field(default_factory=dict)
    # Federated feature selection (study [omics]): its rules, and in the selection round the
    # candidate omics features, in the study's order, each site reports statistics for.
    selection: dict = field(default_factory=dict)
    candidates: list[str] = field(default_factory=list)
    # Imbalance and scale: BCE pos_weight per label (the study's number, or with "balanced"
    # the pooled negatives/positives the label round found; empty = none), local work in
    # epochs of the site's train split (0 = local_steps), and best-round selection on a
    # validation split of that many train rows.
    pos_weight: list[float] = field(default_factory=list)
    local_epochs: float = 0.0
    select_best: bool = False
    validation_fraction: float = 0.15
    # Study [personalization]: part of what each site approved, so checked like the rest of the plan.
    personalization: PersonalizationConfig | None = None

    @classmethod
    def from_study(cls, study: StudyConfig, features: list[str] | None = None, labels: list[str] | None = None) -> TrainingPlan:
        return cls(
            study=study.name,
            task=study.task,
            model=study.model,
            local_steps=study.local_steps,
            batch_size=study.batch_size,
            learning_rate=study.learning_rate,
            optimizer=study.optimizer,
            proximal_mu=study.proximal_mu if study.strategy == "fedprox" else 0.0,
            seed=study.seed,
            model_options=study.model_options,
            categories={k: list(v) for k, v in study.categories.items()},
            features=list(features or []),
            labels=list(labels or []),
            privacy=study.privacy,
            rounds=study.rounds,
            secure_aggregation=study.secure.enabled,
            update_bound=study.update_bound,
            stats_bound=study.secure.stats_bound,
            selection=asdict(study.omics) if study.omics else {},
            pos_weight=[float(study.pos_weight)] if isinstance(study.pos_weight, float) else [],
            local_epochs=study.local_epochs,
            select_best=study.select_best,
            validation_fraction=study.validation_fraction,
            personalization=study.personalization,
        )

    @property
    def personal_method(self) -> str | None:
        """The study's personalization method, or None."""
        return self.personalization.method if self.personalization else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainingPlan:
        raw = json.loads(text)
        opts = raw.pop("model_options")
        privacy = PrivacyConfig(**raw.pop("privacy"))
        opts["hidden"], opts["time_bins"] = tuple(opts["hidden"]), tuple(opts.get("time_bins", ()))
        options = ModelOptions(**opts)
        personal = raw.pop("personalization", None)
        personalization = PersonalizationConfig(**personal) if personal else None
        return cls(**raw, model_options=options, privacy=privacy, personalization=personalization)
