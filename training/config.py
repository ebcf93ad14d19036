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
    if not path.is_file():
        raise ValueError(f"no config {name_or_path!r}: expected a name in "
                         f"training/configs ({', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.yaml')))}) "
                         "or a path to a YAML file")
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


#: Values a classifier config key must take, where a wrong one would not fail at once.
CHOICES = {
    "lr_schedule": ("constant", "cosine"),
    "threshold_set": ("validation", "validation_augmented"),
    "select_metric": ("val_auroc", "last"),
}
#: Keys that must be whole numbers of at least the given value.
MIN_INT = {"epochs": 1, "batch_size": 1, "eval_batch_size": 1, "positive_copies": 0,
           "val_positive_copies": 0, "test_positive_copies": 0, "warmup_steps": 0,
           "num_workers": 0}
#: Keys that must be numbers inside a closed interval.
RANGES = {"learning_rate": (0.0, 1.0), "weight_decay": (0.0, 1.0),
          "augment_probability": (0.0, 1.0), "val_fraction": (0.0, 1.0)}


def validate(config: dict, base: str) -> None:
    """Refuse a config whose keys ``base`` does not know or whose values cannot work.

    Checked before anything is written or trained, so that a typo (``epochz``) or a
    bad value (``lr_schedule: bogus``) stops the run with a message instead of being
    ignored or failing after training.

    Raises:
        ValueError: Naming the key, the value and what is expected.
    """
    known = set(_read(_path(base))) | {"config_file"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known keys are those of "
                         f"training/configs/{base}.yaml")
    for key, choices in CHOICES.items():
        if config.get(key) not in choices:
            raise ValueError(f"{key} must be one of {list(choices)}, got {config.get(key)!r}")
    for key, low in MIN_INT.items():
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{key} must be a whole number >= {low}, got {value!r}")
    for key, (low, high) in RANGES.items():
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                low <= value <= high):
            raise ValueError(f"{key} must be a number in [{low}, {high}], got {value!r}")
    rule = str(config.get("threshold_rule"))
    if rule != "youden":
        name, _, value = rule.partition(":")
        try:
            ok = name == "sensitivity" and 0.0 < float(value) <= 1.0
        except ValueError:
            ok = False
        if not ok:
            raise ValueError("threshold_rule must be 'youden' or 'sensitivity:S' with "
                             f"0 < S <= 1, got {rule!r}")
    target = config.get("target_prevalence")
    if target != "cohort" and not (isinstance(target, (int, float)) and 0.0 < target < 1.0):
        raise ValueError(f"target_prevalence must be 'cohort' or in (0, 1), got {target!r}")
