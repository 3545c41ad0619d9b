"""`--config FILE_OR_NAME` and `--config.FIELD=VALUE` for sam-jax-train, with argparse.

What ml_collections' config_flags accepted, without absl:
  --config FILE[:ARG]        a Python file whose get_config([ARG]) returns a ConfigDict, or the
                             name of a config shipped in the package (sam_jax.configs: `demo`,
                             `sam_vit_b_sa1b`, ...; `configs/NAME.py` falls back to it too)
  --config.a.b=VALUE         any existing field, nested or not; `--config.a.b VALUE` as well
  --config.flag / --noconfig.flag   a bool field set to True / False
VALUE is parsed by the field's existing type: bool (true/false/1/0), int, float, str (as typed),
tuple (a Python literal, `(2,2)` or `1,5`, a bare word is a 1-tuple; a repeated flag appends;
`None` clears an optional tuple), ConfigDict (a dict literal), anything else a Python literal
(falling back to the text). An unknown field, a value of the wrong type or a config that does not
load raises UsageError (one line, naming the closest field).

Why not config_flags itself (tried, 2026-12-06, ml_collections 1.1): its override flags
`--config.FIELD` exist only once absl has loaded `--config`, which works inside `absl.app.run`'s
parsing of the global FLAGS but not on a private FlagValues parsed from argparse's leftovers (the
`--config.x` flags are then unknown and refused), and its errors are absl tracebacks or
`FATAL Flags parsing error` rather than our one line with the closest field name; the commands
keep argparse (one `--help`, one exit-code convention), so this module stays, holding only the
parsing and the typed-value rules above.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import os
import re
from typing import Any

import sam_jax
from sam_jax.cli.common import UsageError

_OVERRIDE = re.compile(r"^--(no)?config\.([^=]+?)(?:=(.*))?$", re.DOTALL)
_NEGATIVE_NUMBER = re.compile(r"^-\.?\d")
_TRUE, _FALSE = ("true", "t", "1", "yes", "y"), ("false", "f", "0", "no", "n")


@dataclasses.dataclass
class Override:
    path: str  # "optimizer.lr"
    text: str | None  # the value as typed; None: a bare --config.flag / --noconfig.flag
    negated: bool = False  # --noconfig.flag

    @property
    def flag(self) -> str:
        return f"--{'no' if self.negated else ''}config.{self.path}"


def split_overrides(argv: list[str]) -> tuple[list[Override], list[str]]:
    """Separates the `--config.FIELD[=VALUE]` arguments (and their values given as the next
    argument) from the rest of argv."""
    overrides, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        m = _OVERRIDE.match(arg)
        if m is None:
            rest.append(arg)
            i += 1
            continue
        negated, path, text = bool(m.group(1)), m.group(2), m.group(3)
        if text is None and not negated and i + 1 < len(argv):
            nxt = argv[i + 1]
            if not nxt.startswith("-") or _NEGATIVE_NUMBER.match(nxt):
                text, i = nxt, i + 1
        if negated and text is not None:
            raise UsageError(f"--noconfig.{path} takes no value")
        if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", path):
            raise UsageError(f"--config.{path}: not a field name")
        overrides.append(Override(path, text, negated))
        i += 1
    return overrides, rest


# Configs: files, and the ones shipped in the package.


def shipped_config_dir() -> str | None:
    """The folder of the shipped configs: the sam_jax.configs package (the top-level configs/
    folder, mapped into the wheel), or configs/ next to sam_jax/ in a source checkout."""
    try:
        spec = importlib.util.find_spec("sam_jax.configs")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]

    source = os.path.dirname(os.path.dirname(os.path.abspath(sam_jax.__file__)))
    folder = os.path.join(source, "configs")
    return folder if os.path.isfile(os.path.join(folder, "__init__.py")) else None


def shipped_configs() -> dict[str, str]:
    """{name: file} of the shipped configs."""
    folder = shipped_config_dir()
    if folder is None:
        return {}
    names = sorted(f for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_"))
    return {f[:-3]: os.path.join(folder, f) for f in names}


def _config_file(name: str) -> str:
    if os.path.isfile(name):
        return name
    shipped = shipped_configs()
    key = name[:-3] if name.endswith(".py") else name
    if key.startswith("configs/"):  # README commands (configs/demo.py) outside the source tree
        key = key[len("configs/") :]
    if key in shipped:
        return shipped[key]
    hint = difflib.get_close_matches(key, list(shipped), n=1, cutoff=0.5)
    known = ", ".join(shipped) or "none found"
    did_you_mean = f"did you mean {hint[0]!r}? " if hint else ""
    raise UsageError(
        f"--config {name!r} is neither a file nor a shipped config ({did_you_mean}shipped: {known})"
    )


def load_config(value: str):
    """The locked ConfigDict of `--config FILE[:ARG]` or `--config NAME[:ARG]`."""
    from ml_collections import ConfigDict

    if not value:
        raise UsageError("--config needs a file or the name of a shipped config")
    name, arg = value, ()
    if not os.path.isfile(value) and ":" in value:
        name, text = value.split(":", 1)
        arg = (text,)
    path = _config_file(name)
    module_name = "sam_jax_config_" + re.sub(r"\W", "_", os.path.basename(path)[:-3] or "x")
    try:
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path} as Python")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        get_config = getattr(module, "get_config", None)
        if get_config is None:
            raise UsageError(f"config file {path} has no get_config()")
        config = get_config(*arg)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the config file is the flag's fault
        raise UsageError(f"config {value!r} does not load: {type(e).__name__}: {e}") from None
    if not isinstance(config, ConfigDict):
        raise UsageError(
            f"config {value!r}: get_config() returned {type(config).__name__}, not a ConfigDict"
        )
    config.lock()
    return config


# Overrides.


def field_paths(config, prefix: str = "") -> list[str]:
    """Every field of a ConfigDict, nested ones as a.b.c (ConfigDicts themselves included)."""
    from ml_collections import ConfigDict

    out = []
    for key in sorted(config.keys()):
        path = prefix + key
        out.append(path)
        value = config[key]
        if isinstance(value, ConfigDict):
            out.extend(field_paths(value, path + "."))
    return out


def closest_field(path: str, candidates: list[str]) -> str | None:
    """The closest field name: a field of the same name elsewhere (`lr` -> `optimizer.lr`), else
    difflib on the whole dotted path, else on its last part."""
    if not candidates:
        return None
    leaf = path.rsplit(".", 1)[-1]
    same_name = [c for c in candidates if c.rsplit(".", 1)[-1] == leaf and c != path]
    if same_name:
        return min(same_name, key=len)
    best = difflib.get_close_matches(path, candidates, n=1, cutoff=0.6)
    if best:
        return best[0]
    leaves = {}
    for c in candidates:
        leaves.setdefault(c.rsplit(".", 1)[-1], c)
    best = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
    if best:
        return leaves[best[0]]
    return max(candidates, key=lambda c: difflib.SequenceMatcher(None, path, c).ratio())


def _holder(config, path: str):
    """(the ConfigDict holding the field, the field name); UsageError for an unknown field."""
    from ml_collections import ConfigDict

    parts = path.split(".")
    holder = config
    for i, part in enumerate(parts):
        if not isinstance(holder, ConfigDict) or part not in holder:
            closest = closest_field(path, field_paths(config))
            where = ".".join(parts[:i]) or "the config"
            hint = f" (did you mean --config.{closest}?)" if closest else ""
            raise UsageError(f"--config.{path}: {where} has no field {part!r}{hint}")
        if i < len(parts) - 1:
            holder = holder[part]
    return holder, parts[-1]


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ValueError(f"not a Python literal: {text!r}") from None


def _parse_bool(text: str) -> bool:
    if text.strip().lower() in _TRUE:
        return True
    if text.strip().lower() in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _parse_int(text: str) -> int:
    s = text.strip()
    for base in (0, 10):
        try:
            return int(s, base)
        except ValueError:
            pass
    raise ValueError(f"expected an integer, got {text!r}")


def _parse_float(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None


def _parse_tuple(text: str):
    """As ml_collections' TupleParser: a literal, made a tuple; a bare word is a 1-tuple."""
    if text.strip() == "None":
        return None
    try:
        value = ast.literal_eval(text)
    except ValueError:
        value = text
    except SyntaxError:
        if "," in text or " " in text:
            raise ValueError(
                f"cannot parse {text!r} as a tuple (quote string elements: \"('a', 'b')\")"
            ) from None
        value = text
    if isinstance(value, tuple):
        return value
    if isinstance(value, (list, set, frozenset)):
        return tuple(value)
    return (value,)


def _parse_any(text: str):
    """Fields without a declared type (None, lists, dicts, ...): a literal, else the text."""
    if text in ("true", "false"):
        return text == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def parse_value(override: Override, field_type: type) -> Any:
    from ml_collections import ConfigDict

    text = override.text
    if text is None:  # a bare --config.flag / --noconfig.flag
        if field_type is bool:
            return not override.negated
        raise ValueError("needs a value (--config.FIELD=VALUE)")
    if override.negated:
        raise ValueError("--noconfig. takes a bool field")
    if field_type is bool:
        return _parse_bool(text)
    if field_type is int:
        return _parse_int(text)
    if field_type is float:
        return _parse_float(text)
    if field_type is str:
        return text
    if field_type is tuple:
        return _parse_tuple(text)
    if isinstance(field_type, type) and issubclass(field_type, ConfigDict):
        value = _literal(text)
        if not isinstance(value, dict):
            raise ValueError(f"expected a dict literal, got {text!r}")
        return ConfigDict(value)
    if field_type in (list, dict, set):
        value = _literal(text)
        if not isinstance(value, field_type):
            raise ValueError(f"expected a {field_type.__name__} literal, got {text!r}")
        return value
    return _parse_any(text)


def apply_overrides(config, overrides: list[Override]) -> dict[str, Any]:
    """Sets every override on `config` (in order; a repeated tuple field appends); returns
    {path: value}. Raises UsageError, one line, for an unknown field or a bad value."""
    for i, a in enumerate(overrides):
        for b in overrides[i + 1 :]:
            if a.path.startswith(b.path + "."):
                raise UsageError(
                    f"{b.flag} comes after {a.flag} and would overwrite it; give it first"
                )
    values: dict[str, Any] = {}
    for o in overrides:
        holder, field = _holder(config, o.path)
        field_type = holder.get_type(field)
        try:
            value = parse_value(o, field_type)
        except ValueError as e:
            raise UsageError(f"{o.flag}: {e}") from None
        if field_type is tuple and o.path in values and value is not None:
            previous = values[o.path]
            value = (previous or ()) + value
        try:
            holder[field] = value
        except (TypeError, ValueError, AttributeError, KeyError) as e:
            raise UsageError(f"{o.flag}={o.text}: {e}") from None
        values[o.path] = value
    return values
