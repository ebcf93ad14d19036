"""Run configuration: YAML files in training/configs, saved resolved beside each run."""

from __future__ import annotations

from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def load_config(name_or_path: str, overrides: list[str] | None = None) -> dict:
    """Read a config by name (``configs/<name>.yaml``) or path; apply ``key=value`` overrides."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    config = yaml.safe_load(path.read_text())
    for item in overrides or []:
        key, _, value = item.partition("=")
        config[key] = yaml.safe_load(value)
    config["config_file"] = str(path)
    return config


def save_config(config: dict, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=True))
