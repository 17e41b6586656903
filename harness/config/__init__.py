"""Experiment configuration: the typed run config (run.py), a study's sweep section (sweep.py) and
the one reader of experiment files (load.py)."""

from harness.config.load import (
    Cell,
    ConfigError,
    Experiment,
    apply_overrides,
    build_config,
    load_config,
    load_experiment,
    parse_value,
    read_yaml,
    resolve_paths,
)
from harness.config.run import (
    MASKINGS,
    DataConfig,
    DPOConfig,
    GenEvalConfig,
    ModelConfig,
    RunConfig,
    SFTConfig,
    TaskConfig,
    TrackingConfig,
    TrainConfig,
    masking_label,
)
from harness.config.sweep import ObjectiveSpec, ParamSpec, PrunerSpec, SweepSpec

__all__ = [
    "MASKINGS", "Cell", "ConfigError", "DPOConfig", "DataConfig", "Experiment", "GenEvalConfig",
    "ModelConfig", "ObjectiveSpec", "ParamSpec", "PrunerSpec", "RunConfig", "SFTConfig",
    "SweepSpec", "TaskConfig", "TrackingConfig", "TrainConfig", "apply_overrides", "build_config",
    "load_config", "load_experiment", "masking_label", "parse_value", "read_yaml", "resolve_paths",
]
