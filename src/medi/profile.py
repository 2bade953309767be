"""Profiles: named sets of params written into params.yaml in one step (`medi profile NAME`, `make repro PROFILE=NAME`).

A profile is `profiles/NAME.yaml`, shaped like params.yaml but holding only the keys it sets (section -> key
-> value; a value replaces the param's whole value, lists and mappings included). Applying it rewrites the
params file with those values, keeping its comments, order and quoting, and marks each changed key with a
comment naming the profile and the value it replaced. The result is an ordinary, complete params.yaml:

- DVC tracks params per stage from params.yaml, so `dvc status`, `dvc params diff` and `dvc exp show` see
  exactly which params the profile changed and re-run only the stages that read them. (A profile kept in a
  file of its own that the stages read, or a switch such as `profile: paper` resolved inside `medi`, would hide
  the changed values from DVC: it would see one changed key, or none.)
- `dvc exp run` runs whatever params.yaml holds: `medi profile paper && dvc exp run -n paper`.
- `git diff params.yaml` shows the recipe; `git checkout params.yaml` returns to the defaults.

Several profiles apply in order (`medi profile paper my-site`), then any `--set KEY=VALUE`, and the result is
validated like every params file before anything is written.
"""
from __future__ import annotations

import copy
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from medi import config
from medi.errors import MediError
from medi.io import write_text

PROFILES_DIR = Path("profiles")


@dataclass(frozen=True)
class Change:
    key: str            # section.key
    old: Any
    new: Any


def profile_path(name: str, directory: Path = PROFILES_DIR) -> Path:
    """`paper` -> profiles/paper.yaml; a path ending in .yaml is taken as it is."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else directory / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in directory.glob("*.yaml")) if directory.is_dir() else []
        raise MediError(f"profile '{name}': {path} not found; known profiles: {', '.join(known) or 'none'}")
    return path


def read_profile(path: Path) -> dict[str, Any]:
    """The profile's settings as {"section.key": value}."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise MediError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise MediError(f"{path}: a profile is a mapping of params sections, got {type(raw).__name__}")
    flat = {}
    for section, keys in raw.items():
        if not isinstance(keys, dict):
            raise MediError(f"{path}: section '{section}': expected a mapping of its keys, got {keys!r}")
        flat.update({f"{section}.{key}": value for key, value in keys.items()})
    return flat


def resolve(base: Mapping[str, Any], settings: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A copy of the raw params `base` with `settings` ({"section.key": value}) set; every key must exist."""
    out = copy.deepcopy(dict(base))
    for dotted, value in settings.items():
        section, _, key = dotted.partition(".")
        if section not in out or not isinstance(out[section], dict) or key not in out[section]:
            raise MediError(f"{where}: '{dotted}' is not a param of params.yaml (a profile only sets existing keys)")
        out[section][key] = copy.deepcopy(value)
    return out


def _yaml():
    from ruamel.yaml import YAML

    rt = YAML()                   # round trip: comments, order and quoting of the file are kept
    rt.preserve_quotes = True
    rt.width = 4096
    rt.representer.add_representer(float, _represent_float)
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return rt                     # (null kept as written: ruamel would write an empty value)


def _represent_float(representer, value: float):
    # PyYAML (YAML 1.1, which medi reads with) takes 1e-06 for a string: always write a dot in the mantissa.
    text = repr(value)
    mantissa, e, exponent = text.partition("e")
    if e and "." not in mantissa:
        text = f"{mantissa}.0e{exponent}"
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


def _node(value: Any) -> Any:
    """A new value in the file's flow style ([a, b], {k: v}); strings YAML 1.1 would misread are quoted."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    if isinstance(value, list):
        node = CommentedSeq([_node(v) for v in value])
        node.fa.set_flow_style()
        return node
    if isinstance(value, dict):
        node = CommentedMap((k, _node(v)) for k, v in value.items())
        node.fa.set_flow_style()
        return node
    if isinstance(value, str) and (value == "" or yaml.safe_load(value) != value):
        return DoubleQuotedScalarString(value)
    return value


def _short(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip().removesuffix("...").strip()


def _mark(section, key: str, note: str) -> None:
    """Prefix the key's end-of-line comment with `note` (or add one)."""
    entry = section.ca.items.get(key)
    token = entry[2] if entry and len(entry) > 2 else None
    if token is not None and token.value.startswith("#"):
        token.value = f"# {note}; " + token.value[1:].lstrip()
        return
    after = token.value if token is not None else ""        # blank lines or comment lines below the key
    section.ca.items.pop(key, None)
    section.yaml_add_eol_comment(note, key, column=38)
    if after:
        new = section.ca.items[key][2]
        new.value = new.value.rstrip("\n") + after


def apply(params: str | Path, profiles: Sequence[str], overrides: Mapping[str, Any] | None = None,
          output: str | Path | None = None, directory: Path = PROFILES_DIR) -> list[Change]:
    """Write `params` with `profiles` (names or .yaml paths, in order) and then `overrides` applied to `output`
    (default: `params` itself). Returns what changed; nothing is written if the result does not validate."""
    params, output = Path(params), Path(output or params)
    if not params.is_file():
        raise MediError(f"params file not found: {params}")
    base = yaml.safe_load(params.read_text())
    settings: dict[str, Any] = {}
    source: dict[str, str] = {}                    # key -> the profile (or --set) that set it last
    for name in profiles:
        path = profile_path(name, directory)
        profile = read_profile(path)
        resolve(base, profile, str(path))          # an unknown key is reported with the profile's file
        settings.update(profile)
        source.update(dict.fromkeys(profile, f"profile {path.stem}"))
    settings.update(overrides or {})
    source.update(dict.fromkeys(overrides or {}, "--set"))
    resolved = resolve(base, settings, "--set")
    config.from_dict(resolved, f"{params} with {', '.join(dict.fromkeys(source.values())) or 'no change'}")

    rt = _yaml()
    doc = rt.load(params.read_text())
    changes = []
    for dotted, value in settings.items():
        section, key = dotted.split(".", 1)
        old = base[section][key]
        if old == value and isinstance(old, bool) == isinstance(value, bool):
            continue
        doc[section][key] = _node(value)
        _mark(doc[section], key, f"{source[dotted]} (was {_short(old)})")
        changes.append(Change(dotted, old, value))
    buf = io.StringIO()
    rt.dump(doc, buf)
    text = buf.getvalue()
    written = yaml.safe_load(text)
    if written != resolved:        # what medi will read back must be what was resolved (a bug here, not bad input)
        bad = [f"{s}.{k}" for s in resolved for k in resolved[s] if written.get(s, {}).get(k) != resolved[s][k]]
        raise RuntimeError(f"{params}: the written params would read back differently at {bad}")
    write_text(output, text)
    return changes
