"""Command lines from config dataclasses, checked before any work is done.

A config field becomes a flag when its metadata carries a kind::

    @dataclass
    class Config:
        preset: str = "cpu"
        steps: int = field(default=300, metadata=option(Int(1), "optimizer steps"))

    cfg = parse_config(Config, PRESETS, argv, prog="python -m experiments.x", description=...)

``--steps`` is parsed as text, ``--preset`` (when the config has a ``preset`` field and there
are presets) picks the defaults, and then every field of the resulting config, given or not,
goes through its kind, which converts a string and checks the value: a bad one stops the
command with one line, ``error: --steps: expected an int >= 1, got 0``, and exit status 2,
before any model is built or any file written. `validate` is the same check for a config
built in code (it raises ValueError naming the flag), so library entry points call it too.
A config may define ``check(self)`` for rules between fields; it raises ValueError with a
message that starts with the flag it blames.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path

import torch


# ----------------------------------------------------------------------------- kinds

class Kind:
    """What a field holds: ``convert(value)`` returns the value as the config keeps it, from
    a command-line string or from a value already of that type, or raises ValueError saying
    what was expected and what it got."""
    metavar: str | None = None

    def convert(self, value):
        raise NotImplementedError

    def from_text(self, text: str, current):
        """A command-line string over the current (preset) value."""
        return self.convert(text)

    def show(self, value) -> str:
        return str(value)

    def _bad(self, expected: str, value):
        return ValueError(f"expected {expected}, got {value!r}")


class Int(Kind):
    """An int in [lo, hi] (either bound may be None)."""
    metavar = "N"

    def __init__(self, lo: int | None = None, hi: int | None = None):
        self.lo, self.hi = lo, hi

    def expected(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"an int in [{self.lo}, {self.hi}]"
        if self.lo is not None:
            return f"an int >= {self.lo}"
        return "an int" if self.hi is None else f"an int <= {self.hi}"

    def convert(self, value):
        given = value
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise self._bad(self.expected(), given) from None
        if isinstance(value, bool) or not isinstance(value, int) or \
                (self.lo is not None and value < self.lo) or \
                (self.hi is not None and value > self.hi):
            raise self._bad(self.expected(), given)
        return value


class Float(Kind):
    """A finite number in [lo, hi] (``lo_open``: lo itself excluded)."""
    metavar = "X"

    def __init__(self, lo: float | None = None, hi: float | None = None, lo_open: bool = False):
        self.lo, self.hi, self.lo_open = lo, hi, lo_open

    def expected(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"a number in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]"
        if self.lo is not None:
            return f"a number {'>' if self.lo_open else '>='} {self.lo:g}"
        return "a finite number" if self.hi is None else f"a number <= {self.hi:g}"

    def convert(self, value):
        given = value
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise self._bad(self.expected(), given) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or (self.lo is not None and (
                    value <= self.lo if self.lo_open else value < self.lo)) \
                or (self.hi is not None and value > self.hi):
            raise self._bad(self.expected(), given)
        return float(value)

    def show(self, value) -> str:
        return f"{value:g}"


class Choice(Kind):
    """One of a few names."""

    def __init__(self, options):
        self.options = tuple(options)
        self.metavar = "{" + ",".join(self.options) + "}"

    def convert(self, value):
        if isinstance(value, str):
            value = value.strip()
        if value not in self.options:
            raise self._bad("one of " + ", ".join(self.options), value)
        return value


class Ints(Kind):
    """A comma list of ints >= lo (a tuple; empty only with ``empty=True``)."""
    metavar = "N,N,..."

    def __init__(self, lo: int = 1, empty: bool = False):
        self.lo, self.empty = lo, empty

    def convert(self, value):
        expected = f"a comma list of ints >= {self.lo}"
        items = value.split(",") if isinstance(value, str) else value
        try:
            out = tuple(int(s) if isinstance(s, str) else s for s in items
                        if not isinstance(s, str) or s.strip())
        except (TypeError, ValueError):
            raise self._bad(expected, value) from None
        if (not out and not self.empty) or any(
                isinstance(v, bool) or not isinstance(v, int) or v < self.lo for v in out):
            raise self._bad(expected, value)
        return out

    def show(self, value) -> str:
        return ",".join(map(str, value))


class Names(Kind):
    """A comma list of names among ``options`` (a tuple, order kept; empty only with
    ``empty=True``)."""
    metavar = "A,B,..."

    def __init__(self, options, empty: bool = False):
        self.options, self.empty = tuple(options), empty

    def convert(self, value):
        expected = "a comma list of " + ", ".join(self.options)
        items = value.split(",") if isinstance(value, str) else value
        try:
            out = tuple(s.strip() for s in items if s.strip())
        except (TypeError, AttributeError):
            raise self._bad(expected, value) from None
        if (not out and not self.empty) or any(s not in self.options for s in out):
            raise self._bad(expected, value)
        return out

    def show(self, value) -> str:
        return ",".join(value)


class Text(Kind):
    """Any non-empty string."""

    def convert(self, value):
        if not isinstance(value, str) or not value.strip():
            raise self._bad("a non-empty string", value)
        return value


class Device(Kind):
    """cpu, cuda or cuda:i, and CUDA only where there is a CUDA device."""
    metavar = "DEVICE"

    def convert(self, value):
        kind, _, index = str(value).partition(":")
        if not isinstance(value, str) or kind not in ("cpu", "cuda") or \
                (index and (kind == "cpu" or not index.isdigit())):
            raise self._bad("cpu, cuda or cuda:i", value)
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"expected cpu here (no CUDA device is available), got {value!r}")
        return value


class OutDir(Kind):
    """A folder to write into: an existing folder, or a path that can be made one (its nearest
    existing ancestor is a writable folder). Never an existing file."""
    metavar = "DIR"

    def convert(self, value):
        if not isinstance(value, str) or not value.strip():
            raise self._bad("a folder path", value)
        path = Path(value)
        if path.exists() and not path.is_dir():
            raise ValueError(f"expected a folder, got the file {value!r}")
        up = path
        while not up.exists() and up != up.parent:
            up = up.parent
        up = up if up.exists() else Path(".")
        if not up.is_dir():
            raise ValueError(f"expected a folder path, got {value!r} (its parent {str(up)!r} "
                             f"is a file)")
        if not os.access(up, os.W_OK | os.X_OK):
            raise ValueError(f"expected a writable folder, got {value!r} ({str(up)!r} is not "
                             f"writable)")
        return value


class InFile(Kind):
    """An existing file to read."""
    metavar = "PATH"

    def convert(self, value):
        if not isinstance(value, str) or not Path(value).is_file():
            raise self._bad("an existing file", value)
        return value


class InDir(Kind):
    """An existing folder, holding ``holding`` when given."""
    metavar = "DIR"

    def __init__(self, holding: str | None = None):
        self.holding = holding

    def convert(self, value):
        if not isinstance(value, str) or not Path(value).is_dir():
            raise self._bad("an existing folder", value)
        if self.holding and not (Path(value) / self.holding).is_file():
            raise ValueError(f"expected a folder holding {self.holding}, got {value!r} "
                             f"(no {Path(value) / self.holding})")
        return value


class Flag(Kind):
    """A switch: present on the command line is True."""

    def convert(self, value):
        if not isinstance(value, bool):
            raise self._bad("True or False", value)
        return value

    def show(self, value) -> str:
        return "on" if value else "off"


class Optional(Kind):
    """None, or a value of ``kind``."""

    def __init__(self, kind: Kind):
        self.kind, self.metavar = kind, kind.metavar

    def convert(self, value):
        return None if value is None else self.kind.convert(value)

    def from_text(self, text, current):
        return self.kind.from_text(text, current)

    def show(self, value) -> str:
        return "none" if value is None else self.kind.show(value)


class KeyValues(Kind):
    """``K=V,...`` over the current dict; V is a Python literal or a bare word. Keys must be
    among ``keys()``, and ``check(dict)`` (e.g. a config class) must accept the result."""
    metavar = "K=V,..."

    def __init__(self, keys, check=None):
        self.keys, self.check = keys, check

    def from_text(self, text, current):
        import ast
        out = dict(current or {})
        allowed = self.keys()
        for item in filter(None, (t.strip() for t in text.split(","))):
            key, sep, raw = (s.strip() for s in item.partition("="))
            if not sep or key not in allowed:
                raise ValueError(f"expected KEY=VALUE pairs with KEY among {allowed}, "
                                 f"got {item!r}")
            try:
                out[key] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                out[key] = raw                      # a bare word, e.g. backend=torch
        return self.convert(out)

    def convert(self, value):
        if not isinstance(value, dict):
            raise self._bad("KEY=VALUE pairs", value)
        bad = sorted(set(value) - set(self.keys()))
        if bad:
            raise ValueError(f"expected keys among {self.keys()}, got {bad}")
        if self.check is not None:
            try:
                self.check(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(str(exc)) from None
        return value

    def show(self, value) -> str:
        return ",".join(f"{k}={v}" for k, v in value.items()) or "the preset's"


# ----------------------------------------------------------------------------- fields

def option(kind: Kind, help: str, *, shown: str | None = None) -> dict:
    """A config field's metadata that makes it a flag: its kind, its help, and (optional) how
    --help states its default when the field's own value does not say it (a derived one)."""
    return {"kind": kind, "help": help, "shown": shown}


def threads_field():
    """The ``threads`` field every experiment has: torch's intra-op threads, one in the CPU
    presets (see `experiments.timing.torch_threads`)."""
    return dataclasses.field(default=None, metadata=option(
        Optional(Int(1)), "torch intra-op threads",
        shown="1 with --preset cpu, torch's default with --preset h100"))


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _options(cls):
    return [f for f in dataclasses.fields(cls) if "kind" in f.metadata]


def _field_default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def shown_default(f, presets: dict) -> str:
    """A field's default as --help states it: per preset where the presets differ."""
    meta = f.metadata
    if meta.get("shown"):
        return meta["shown"]
    base = _field_default(f)
    per = {p: presets[p].get(f.name, base) for p in presets} or {"": base}
    texts = {p: meta["kind"].show(v) for p, v in per.items()}
    if len(set(texts.values())) == 1:
        return next(iter(texts.values()))
    return ", ".join(f"{t} with --preset {p}" for p, t in texts.items())


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (exit status 2)."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def build_parser(cls, presets: dict, *, prog: str, description: str) -> argparse.ArgumentParser:
    """The ArgumentParser of a config dataclass: --preset, then one flag per option field."""
    p = _Parser(prog=prog, description=description,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    names = {f.name for f in dataclasses.fields(cls)}
    if presets and "preset" in names:
        default = _field_default(next(f for f in dataclasses.fields(cls) if f.name == "preset"))
        p.add_argument("--preset", default=default, metavar="{" + ",".join(presets) + "}",
                       help=f"the defaults of every flag (default: {default})")
    for f in _options(cls):
        kind = f.metadata["kind"]
        text = f"{f.metadata['help']} (default: {shown_default(f, presets)})".replace("%", "%%")
        if isinstance(kind, Flag):
            p.add_argument(flag_name(f.name), action="store_true", default=argparse.SUPPRESS,
                           help=text)
        else:
            p.add_argument(flag_name(f.name), default=argparse.SUPPRESS, metavar=kind.metavar,
                           help=text)
    return p


# ----------------------------------------------------------------------------- checking

def validate(cfg, rules: bool = True) -> None:
    """Convert and check every option field of ``cfg`` in place, then (``rules``) the rules
    between fields, ``cfg.check()``, if it has one. Raises ValueError: ``--flag: expected ...,
    got ...``."""
    for f in _options(type(cfg)):
        try:
            setattr(cfg, f.name, f.metadata["kind"].convert(getattr(cfg, f.name)))
        except ValueError as exc:
            raise ValueError(f"{flag_name(f.name)}: {exc}") from None
    if rules and hasattr(cfg, "check"):
        cfg.check()


def parse_config(cls, presets: dict, argv=None, *, prog: str, description: str, derive=None):
    """The config of a command line: the field defaults, the preset's, the flags given, each
    field checked by `validate`; then ``derive(cfg)`` (defaults computed from the other fields,
    which it may take as checked) and `validate` again, with the rules between fields. A bad
    command line exits with status 2 and one line naming the flag."""
    parser = build_parser(cls, presets, prog=prog, description=description)
    given = vars(parser.parse_args(argv))
    preset = given.pop("preset", None)
    try:
        preset = None if preset is None else Choice(presets).convert(preset)
    except ValueError as exc:
        parser.error(f"--preset: {exc}")
    cfg = cls(**({"preset": preset} if preset is not None else {}),
              **(presets.get(preset, {}) if preset is not None else {}))
    fields = {f.name: f for f in _options(cls)}
    try:
        for name, text in given.items():
            kind = fields[name].metadata["kind"]
            if isinstance(kind, Flag):
                setattr(cfg, name, text)
                continue
            try:
                setattr(cfg, name, kind.from_text(text, getattr(cfg, name)))
            except ValueError as exc:
                raise ValueError(f"{flag_name(name)}: {exc}") from None
        validate(cfg, rules=derive is None)
        if derive is not None:
            derive(cfg)
            validate(cfg)
    except ValueError as exc:
        parser.error(str(exc))
    return cfg


def fail(message: str) -> None:
    """Stop a command whose arguments are wrong, as `parse_config` does: one line, status 2."""
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(2)
