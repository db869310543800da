"""Named presets. `get_config(name)` returns a validated `TrainConfig`; overrides go on top."""

from configs.presets import PRESETS, get_config, list_configs

__all__ = ["PRESETS", "get_config", "list_configs"]
