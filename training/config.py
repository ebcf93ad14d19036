"""Run configuration: YAML files in training/configs, saved resolved beside each run.

A config may name another with ``extends: NAME``; its keys override that one's. Every
key carries a one-line comment in the YAML file saying why it has its value.
"""

from __future__ import annotations

from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def _path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    return CONFIG_DIR / f"{name_or_path}.yaml" if not path.suffix else path


def _read(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if path in seen:
        raise ValueError(f"config extends must not loop, got {' -> '.join(map(str, seen))}")
    config = yaml.safe_load(path.read_text()) or {}
    parent = config.pop("extends", None)
    if parent is None:
        return config
    return {**_read(_path(parent), (*seen, path)), **config}


def load_config(name_or_path: str, overrides: list[str] | None = None,
                base: str | None = None) -> dict:
    """Read a config by name (``configs/<name>.yaml``) or path, resolved.

    Args:
        name_or_path: Config name or YAML path.
        overrides: ``key=value`` strings; values are parsed as YAML.
        base: Config whose keys fill in what the file (and what it extends) leaves
            out, e.g. the defaults of a training script.

    Raises:
        ValueError: If an override is not ``key=value``.
    """
    path = _path(name_or_path)
    config = _read(path)
    if base is not None:
        config = {**_read(_path(base)), **config}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override must be key=value, got {item!r}")
        config[key] = yaml.safe_load(value)
    config["config_file"] = str(path)
    return config


def save_config(config: dict, run_dir: Path) -> None:
    """Write the resolved config as ``config.yaml`` in the run folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=True))
