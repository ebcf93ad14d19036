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
    """One config file with what it extends, as a dict.

    Raises:
        ValueError: A loop of ``extends``, a file that is missing, not YAML, or not a
            mapping of keys to values.
    """
    if path in seen:
        raise ValueError(f"config extends must not loop, got {' -> '.join(map(str, seen))}")
    if not path.is_file():
        raise ValueError(f"no config {str(path)!r}" + (
            f" (named by 'extends' in {seen[-1]})" if seen else "")
            + "; expected a name in training/configs or a path to a YAML file")
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"config {path} is not readable YAML: {reason}") from None
    config = {} if config is None else config
    if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
        raise ValueError(f"config {path} must be a mapping of keys to values "
                         f"(key: value lines), got a {type(config).__name__}")
    parent = config.pop("extends", None)
    if parent is None:
        return config
    return {**_read(_path(str(parent)), (*seen, path)), **config}


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
        try:
            config[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"override {item!r}: the value is not valid YAML") from None
    # Provenance: the config file named and the --set values given. A run's saved
    # config.yaml carries both, so resuming from it keeps how the run was first made.
    config.setdefault("config_file", str(path))
    earlier = config.get("config_overrides", [])
    if not isinstance(earlier, list) or not all(isinstance(x, str) for x in earlier):
        raise ValueError(f"config_overrides in {path} must be a list of key=value strings "
                         f"(as a run's config.yaml records them), got {earlier!r}")
    config["config_overrides"] = [*earlier, *(overrides or [])]
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
    known = set(_read(_path(base))) | {"config_file", "config_overrides"}
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
    from femurrisk.registry import CLASSIFIERS

    if config.get("architecture") not in CLASSIFIERS:
        raise ValueError(f"architecture must be one of {list(CLASSIFIERS)}, "
                         f"got {config.get('architecture')!r}")
    seed = config.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a whole number >= 0, got {seed!r}")
    for key in ("amp", "cudnn_benchmark", "augment_all_classes", "augment_acquisition"):
        if not isinstance(config.get(key), bool):
            raise ValueError(f"{key} must be true or false, got {config.get(key)!r}")
    for key in ("augment_rotate_deg", "augment_scale", "augment_noise_hu",
                "augment_offset_hu"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                0.0 <= value < float("inf")):
            raise ValueError(f"{key} must be a number >= 0, got {value!r}")
    if not isinstance(config.get("data"), str) or not config["data"]:
        raise ValueError(f"data must be the folder holding crops.npz, got "
                         f"{config.get('data')!r}")
    shift = config.get("augment_translate_voxels")
    if not (isinstance(shift, list) and len(shift) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool)
            and 0 <= v < float("inf") for v in shift)):
        raise ValueError(f"augment_translate_voxels must be a list of three numbers >= 0 "
                         f"(x, y, z voxels), got {shift!r}")
    limit = config.get("max_test_patients")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or limit < 1):
        raise ValueError(f"max_test_patients must be null or a whole number >= 1, "
                         f"got {limit!r}")
    if not 0.0 < config.get("val_fraction", 0.2) < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {config.get('val_fraction')!r}")
    if config.get("prepare") is not None and not isinstance(config["prepare"], str):
        raise ValueError(f"prepare must be null or training.prepare arguments as one "
                         f"string, got {config['prepare']!r}")
    weights = config.get("init_weights")
    if weights is not None and not Path(str(weights)).is_file():
        raise ValueError(f"init_weights must be null or a .safetensors file of an earlier "
                         f"run, got {weights!r} (no such file)")
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
