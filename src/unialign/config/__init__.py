"""Typed configuration: the run's schema (:mod:`.schema`), loading YAML with overrides and path
checks (:mod:`.loading`), and the inference contract a checkpoint carries (:mod:`.inference`)."""

from .inference import InferenceConfig, Preprocess
from .loading import ConfigError, apply_overrides, load_config, parse_config, save_config
from .schema import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Config,
    DataConfig,
    DataSource,
    FreezeLayers,
    ImageTowerConfig,
    KarpathySource,
    LossConfig,
    ManifestSource,
    ModelConfig,
    SharedConfig,
    TeacherConfig,
    TextTowerConfig,
    TrainConfig,
    WebDatasetSource,
)

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "Config", "ConfigError", "DataConfig", "DataSource", "FreezeLayers",
    "ImageTowerConfig", "InferenceConfig", "KarpathySource", "LossConfig", "ManifestSource", "ModelConfig",
    "Preprocess", "SharedConfig", "TeacherConfig", "TextTowerConfig", "TrainConfig", "WebDatasetSource",
    "apply_overrides", "load_config", "parse_config", "save_config",
]
