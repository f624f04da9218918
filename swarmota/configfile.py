"""Configuration files (TOML) for the services and the device: ``--config FILE``.

The keys of a file are the options of the command that reads it, taken from that
command's own argparse parser when the command tree is built (:func:`install`): a key
is the option's destination (``--poll-after-s`` is ``poll_after_s``, ``--tls-pin``
repeated is the array ``tls_pins``, ``--no-seed`` is ``seed = false``, a positional
argument such as STATE is ``state``); its type, choices, default and help are the
option's. So the parser, the file and the reference (``python -m swarmota.configdoc``,
docs/CONFIGURATION.md) cannot drift: there is one definition.

Kinds of file, and the tables each holds::

    tracker   [tracker]  tracker serve
    origin    [origin]   seeder serve
    device    [device]   peer init
              [agent]    peer run, peer update (``state`` comes from [device] if absent)

Precedence: an option given on the command line, then the file, then the option's
default. A repeated option given on the command line replaces the file's array; an
option of a mutually exclusive group given there drops the file's keys of that group.
Relative paths in a file are relative to the file's directory. What is not right is
refused before the command does anything, with the file, the key and what is expected
(:class:`ConfigFileError`; exit code 2). ``--json`` and ``--help`` are command-line only.

``swarmota config check FILE [--kind KIND]`` validates a file (kind from its tables).
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final

from swarmota.infra.tomlfile import TomlFileError, read_toml_file

__all__ = [
    "COMMAND_LINE_ONLY",
    "KINDS",
    "Command",
    "ConfigFileError",
    "Key",
    "Kind",
    "LoadedFile",
    "Schema",
    "Table",
    "add_parser",
    "install",
    "load_file",
]

COMMAND_LINE_ONLY: Final = frozenset({"help", "config_file", "json"})
"""Destinations that are never keys of a file (``--json`` shapes one command's output)."""

Check = Callable[[argparse.Namespace], None]
"""What a command checks of its settings before doing anything (raises an exception
whose message says what is wrong)."""


class ConfigFileError(ValueError):
    """A configuration file that cannot be used; ``problems``: one line each, every one
    naming the file (and the key)."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = tuple(problems)


@dataclass(frozen=True)
class Command:
    """A command reading a table: its words (``("peer", "run")``) and, optionally, the
    checks it makes of its settings (run by ``config check`` too)."""

    words: tuple[str, ...]
    check: Check | None = None

    @property
    def name(self) -> str:
        return " ".join(self.words)


@dataclass(frozen=True)
class Table:
    """A table of a file: its name, the commands reading it, the keys it may take from
    another table when it lacks them (``inherit``: key -> table)."""

    name: str
    commands: tuple[Command, ...]
    inherit: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Kind:
    """A kind of configuration file: its name, what it configures, its tables."""

    name: str
    summary: str
    tables: tuple[Table, ...]


def _peer_init_check(args: argparse.Namespace) -> None:
    from swarmota.peer.cli import prepare_init
    from swarmota.peer.errors import ConfigError
    try:
        prepare_init(args)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


def _tracker_serve_check(args: argparse.Namespace) -> None:
    from swarmota.tracker.cli import check_serve_args
    from swarmota.tracker.errors import ConfigError
    try:
        check_serve_args(args)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


KINDS: Final = (
    Kind("tracker", "the tracker (swarmota tracker serve)",
         (Table("tracker", (Command(("tracker", "serve"), _tracker_serve_check),)),)),
    Kind("origin", "the origin server and seeder (swarmota seeder serve)",
         (Table("origin", (Command(("seeder", "serve")),)),)),
    Kind("device", "a device: its provisioning (swarmota peer init) and its agent "
                   "(swarmota peer run, peer update)",
         (Table("device", (Command(("peer", "init"), _peer_init_check),)),
          Table("agent", (Command(("peer", "run")), Command(("peer", "update"))),
                inherit={"state": "device"}))),
)


@dataclass(frozen=True)
class Key:
    """One key of a table: an option of the command(s) reading it."""

    name: str
    action: argparse.Action
    default: Any
    """The option's default as the parser had it (before :func:`install`)."""
    required: bool
    help: str
    exclusive_with: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        """How the option is spelled on the command line (``--db``, ``STATE``)."""
        if self.action.option_strings:
            return max(self.action.option_strings, key=len)
        return str(self.action.metavar or self.action.dest).upper()

    @property
    def is_bool(self) -> bool:
        return isinstance(self.action, argparse._StoreTrueAction | argparse._StoreFalseAction)

    @property
    def is_list(self) -> bool:
        return isinstance(self.action, argparse._AppendAction)

    @property
    def type_name(self) -> str:
        """The TOML type expected, for messages and the reference."""
        if self.is_bool:
            return "boolean"
        scalar = self._scalar_type_name()
        return f"array of {scalar}s" if self.is_list else scalar

    def _scalar_type_name(self) -> str:
        kind = self.action.type
        if kind is None:
            return "string"
        if kind in (int, float, Path):
            return {int: "integer", float: "number", Path: "path"}[kind]
        return f"{self.action.metavar or 'value'} (string or number)"

    def convert(self, value: Any, base: Path) -> Any:
        """The option's value for ``value`` read from a file in ``base``.

        Raises:
            ValueError: what is wrong and what is expected (without the file and key).
        """
        if self.is_bool:
            if not isinstance(value, bool):
                raise ValueError(f"expected true or false, got {_describe(value)}")
            return value
        if self.is_list:
            if not isinstance(value, list):
                raise ValueError(f"expected an {self.type_name}, got {_describe(value)}")
            return [self._scalar(item, base) for item in value]
        return self._scalar(value, base)

    def _scalar(self, value: Any, base: Path) -> Any:
        kind = self.action.type
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError(f"expected {_a(self._scalar_type_name())}, got {_describe(value)}")
        if kind is int:
            if not isinstance(value, int):
                raise ValueError(f"expected an integer, got {_describe(value)}")
            out: Any = value
        elif kind is float:
            if not isinstance(value, int | float):
                raise ValueError(f"expected a number, got {_describe(value)}")
            out = float(value)
        elif kind is None or kind is Path:
            if not isinstance(value, str):
                raise ValueError(f"expected {_a(self._scalar_type_name())}, got "
                                 f"{_describe(value)}")
            if kind is Path:
                if not value:
                    raise ValueError("expected a path, got an empty string")
                path = Path(value).expanduser()
                out = path if path.is_absolute() else base / path
            else:
                out = value
        else:
            convert: Callable[[str], Any] = kind  # type: ignore[assignment]
            try:
                out = convert(str(value))
            except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
                raise ValueError(f"{exc} (as for {self.flag})") from None
            if isinstance(out, Path) and not out.is_absolute():
                out = base / out  # e.g. --db: a path or a URL; a path is the file's
        choices = self.action.choices
        if choices is not None and out not in choices:
            raise ValueError(f"expected one of {', '.join(map(str, choices))}, got {value!r}")
        return out

    def default_value(self) -> Any:
        """The default, converted as argparse converts a string default."""
        if isinstance(self.default, str) and self.action.type is not None:
            convert: Callable[[str], Any] = self.action.type  # type: ignore[assignment]
            return convert(self.default)
        if isinstance(self.default, list):
            return list(self.default)
        return self.default


@dataclass(frozen=True)
class Schema:
    """Every kind of file with the keys of its tables (from the parsers)."""

    kinds: Mapping[str, Kind]
    keys: Mapping[str, Mapping[str, Key]]
    """Table name -> key name -> :class:`Key` (the union of its commands' options)."""
    command_keys: Mapping[str, frozenset[str]]
    """Command name (``"peer run"``) -> the keys it reads."""

    def kind_of_table(self, table: str) -> Kind | None:
        for kind in self.kinds.values():
            if any(t.name == table for t in kind.tables):
                return kind
        return None


@dataclass(frozen=True)
class LoadedFile:
    """A file as validated: its kind and, per table present, the values of its keys."""

    path: Path
    kind: Kind
    values: Mapping[str, Mapping[str, Any]]
    guessed_from: str | None = None
    """The table the kind was guessed from, or ``None`` if it was given."""

    def for_command(self, schema: Schema, table: Table, command: Command) -> dict[str, Any]:
        """The values ``command`` takes from the file (its table, then inherited keys)."""
        wanted = schema.command_keys[command.name]
        out = {k: v for k, v in self.values.get(table.name, {}).items() if k in wanted}
        for key, source in table.inherit.items():
            if key in wanted and key not in out and key in self.values.get(source, {}):
                out[key] = self.values[source][key]
        return out


# --- building: the parsers are the definitions ------------------------------------------


def install(root: argparse.ArgumentParser) -> Schema:
    """Give each command of :data:`KINDS` in the tree ``root`` a ``--config FILE`` and
    collect their keys. Each option's default and required flag move into the schema:
    the parser then leaves out what was not given (``argparse.SUPPRESS``) so that the
    file can fill it in (help texts keep showing the defaults).

    Raises:
        RuntimeError: a command is missing, an option cannot be a key (e.g. ``count``),
            or two commands of one table disagree on a key (a programming bug).
    """
    keys: dict[str, dict[str, Key]] = {}
    command_keys: dict[str, frozenset[str]] = {}
    found: list[tuple[argparse.ArgumentParser, Kind, Table, Command, dict[str, Key]]] = []
    for kind in KINDS:
        for table in kind.tables:
            table_keys = keys.setdefault(table.name, {})
            for command in table.commands:
                parser = _find(root, command.words)
                own = _keys_of(parser)
                for name, key in own.items():
                    other = table_keys.setdefault(name, key)
                    if other.type_name != key.type_name:
                        raise RuntimeError(f"[{table.name}] {name}: {other.type_name} in one "
                                           f"command, {key.type_name} in {command.name}")
                command_keys[command.name] = frozenset(own)
                found.append((parser, kind, table, command, own))
    schema = Schema({k.name: k for k in KINDS}, keys, command_keys)
    for parser, kind, table, command, own in found:
        _make_configurable(schema, parser, kind, table, command, own)
    return schema


_NOT_GIVEN: Final = object()
"""The default of a positional argument that a file may give."""


def _find(root: argparse.ArgumentParser, words: Iterable[str]) -> argparse.ArgumentParser:
    parser = root
    for word in words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            raise RuntimeError(f"no command {word!r} in {parser.prog}")
        parser = subs[0].choices[word]
    return parser


def _keys_of(parser: argparse.ArgumentParser) -> dict[str, Key]:
    exclusive: dict[str, set[str]] = {}
    for group in parser._mutually_exclusive_groups:
        dests = {a.dest for a in group._group_actions}
        for dest in dests:
            exclusive.setdefault(dest, set()).update(dests - {dest})
    out: dict[str, Key] = {}
    for action in parser._actions:
        if action.dest in COMMAND_LINE_ONLY or isinstance(action, argparse._HelpAction):
            continue
        flag = isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction)
        valued = isinstance(action, argparse._StoreAction | argparse._AppendAction)
        if not (flag or (valued and action.nargs in (None, "?"))):
            raise RuntimeError(f"{parser.prog} {action.dest}: this kind of option cannot "
                               "be a key of a configuration file")
        help_text = _expand_help(parser, action)
        out[action.dest] = Key(action.dest, action, action.default,
                               action.required or not action.option_strings, help_text,
                               tuple(sorted(exclusive.get(action.dest, ()))))
    return out


def _expand_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help as ``--help`` shows it (``%(default)s`` filled in)."""
    if not action.help:
        return ""
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    if params.get("choices") is not None:
        params["choices"] = ", ".join(map(str, params["choices"]))
    return action.help % dict(params, prog=parser.prog)


def _make_configurable(schema: Schema, parser: argparse.ArgumentParser, kind: Kind,
                       table: Table, command: Command, keys: Mapping[str, Key]) -> None:
    for action in parser._actions:
        key = keys.get(action.dest)
        if key is None:
            continue
        if action.help:  # shown as it was; '%' escaped since argparse formats it again
            action.help = key.help.replace("%", "%%")
        action.required = False
        if action.option_strings:
            action.default = argparse.SUPPRESS
        else:  # argparse (3.11) would convert a SUPPRESS string through the type
            action.default = _NOT_GIVEN
            action.nargs = "?"
    inherited = "".join(f"; {k} may come from [{t}]" for k, t in table.inherit.items())
    parser.add_argument(
        "--config", dest="config_file", type=Path, metavar="FILE", default=None,
        help=f"TOML file whose [{table.name}] table holds settings of this command: every "
             f"option is a key (docs/CONFIGURATION.md lists them{inherited}); options "
             "given here override the file")
    func = parser.get_default("func")
    if func is None:
        raise RuntimeError(f"{parser.prog} has no func")
    parser.set_defaults(func=partial(_run_command, schema, parser, kind, table, command, keys,
                                      func))


def _run_command(schema: Schema, parser: argparse.ArgumentParser, kind: Kind, table: Table,
                 command: Command, keys: Mapping[str, Key],
                 func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Fill in ``args`` from the file (if any) and the defaults, then run ``func``."""
    for name in keys:
        if getattr(args, name, None) is _NOT_GIVEN:
            delattr(args, name)
    from_file: dict[str, Any] = {}
    if args.config_file is not None:
        try:
            loaded = load_file(schema, args.config_file, kind.name)
        except ConfigFileError as exc:
            for line in exc.problems:
                print(f"error: {line}", file=sys.stderr)
            return 2
        from_file = loaded.for_command(schema, table, command)
    for name in [n for n in keys if hasattr(args, n)]:
        for other in keys[name].exclusive_with:  # the command line wins over the file
            from_file.pop(other, None)
    missing = [key for name, key in keys.items()
               if key.required and not hasattr(args, name) and name not in from_file]
    if missing:
        where = (f"in the [{table.name}] table of {args.config_file}"
                 if args.config_file is not None else f"in the [{table.name}] table of a "
                                                      "--config file")
        parser.error("the following arguments are required: "
                     f"{', '.join(k.flag for k in missing)} (as options, or as the keys "
                     f"{', '.join(k.name for k in missing)} {where})")
    for name, key in keys.items():
        if not hasattr(args, name):
            setattr(args, name, from_file[name] if name in from_file else key.default_value())
    return func(args)


# --- reading and checking a file ----------------------------------------------------------


def load_file(schema: Schema, path: Path, kind: str | None = None) -> LoadedFile:
    """Read and validate ``path`` as a file of ``kind`` (``None``: guessed from its
    tables). Values are converted as the options' own types convert them.

    Raises:
        ConfigFileError: every problem found, each naming the file and the key.
    """
    try:
        doc = read_toml_file(path).doc
    except FileNotFoundError:
        raise ConfigFileError([f"config file {path} does not exist"]) from None
    except TomlFileError as exc:
        raise ConfigFileError([str(exc)]) from None
    guessed_from = None
    if kind is None:
        found = {t: k for t in doc if (k := schema.kind_of_table(t)) is not None}
        kinds = sorted({k.name for k in found.values()})
        if len(kinds) != 1:
            tables = ", ".join(f"[{t.name}]" for k in schema.kinds.values() for t in k.tables)
            reason = (f"it has tables of several kinds ({', '.join(kinds)})" if kinds else
                      f"it has none of the tables {tables}")
            raise ConfigFileError([f"{path}: cannot tell which kind of configuration file "
                                   f"this is: {reason}; give --kind "
                                   f"{'|'.join(schema.kinds)}"])
        guessed_from = sorted(found)[0]
        kind = kinds[0]
    spec = schema.kinds[kind]
    names = [t.name for t in spec.tables]
    problems: list[str] = []
    values: dict[str, dict[str, Any]] = {}
    base = path.absolute().parent
    for name, table in doc.items():
        if name not in names:
            problems.append(f"{path}: unknown table or key {name!r}; a {kind} configuration "
                            f"file holds {', '.join(f'[{n}]' for n in names)}")
        elif not isinstance(table, dict):
            problems.append(f"{path}: {name!r} must be a table ([{name}])")
        else:
            values[name] = _table_values(schema.keys[name], path, name, table, base, problems)
    if problems:
        raise ConfigFileError(problems)
    return LoadedFile(path, spec, values, guessed_from)


def _table_values(keys: Mapping[str, Key], path: Path, table: str, raw: Mapping[str, Any],
                  base: Path, problems: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in raw.items():
        key = keys.get(name)
        if key is None:
            close = difflib.get_close_matches(name, list(keys), n=1)
            hint = f"did you mean {table}.{close[0]}? " if close else ""
            problems.append(f"{path}: unknown key '{table}.{name}'; {hint}the keys of "
                            f"[{table}] are listed in docs/CONFIGURATION.md")
            continue
        try:
            out[name] = key.convert(value, base)
        except ValueError as exc:
            problems.append(f"{path}: {table}.{name}: {exc}")
    for name in out:
        for other in keys[name].exclusive_with:
            if other in out and name < other:
                problems.append(f"{path}: {table}.{name} and {table}.{other} exclude each "
                                f"other ({keys[name].flag} / {keys[other].flag}): keep one")
    return out


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value[:80]!r}"
    return f"a {type(value).__name__}"  # dates and times


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


# --- swarmota config check ----------------------------------------------------------------


def add_parser(subparsers: Any, schema: Schema) -> None:
    """``swarmota config check FILE [--kind KIND]``."""
    config = subparsers.add_parser(
        "config", help="check configuration files",
        description="Configuration files (TOML) of 'tracker serve', 'seeder serve' and the "
                    "device ('peer init', 'peer run', 'peer update'); the reference of "
                    "every key is docs/CONFIGURATION.md.")
    sub = config.add_subparsers(dest="config_command", metavar="COMMAND", required=True)
    check = sub.add_parser(
        "check", help="validate a configuration file",
        description="Validate FILE: its tables and keys, each value's type and allowed "
                    "values, and what the commands reading it check before starting (files "
                    "it names exist and are usable, settings that go together). Exit "
                    "code 0: usable; 2: not (each problem names the file and the key).")
    check.add_argument("file", metavar="FILE", type=Path)
    check.add_argument("--kind", choices=tuple(schema.kinds), default=None,
                       help="the kind of file (default: guessed from its tables: "
                            + ", ".join(f"[{t.name}] {k.name}" for k in schema.kinds.values()
                                        for t in k.tables) + ")")
    check.set_defaults(func=partial(_check, schema))


def _check(schema: Schema, args: argparse.Namespace) -> int:
    try:
        loaded = load_file(schema, args.file, args.kind)
    except ConfigFileError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
    how = (f"guessed from its [{loaded.guessed_from}] table" if loaded.guessed_from
           else "as given")
    problems, notes = check_commands(schema, loaded)
    for line in notes:
        print(f"note: {line}")
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    if problems:
        return 2
    counts = ", ".join(f"[{t}] {len(v)} keys" for t, v in loaded.values.items()) or "empty"
    print(f"{args.file}: a valid {loaded.kind.name} configuration file ({how}; {counts})")
    return 0


def check_commands(schema: Schema, loaded: LoadedFile) -> tuple[list[str], list[str]]:
    """Run the checks of each command reading a table the file has: problems (the
    settings are refused) and notes (options the file leaves to the command line)."""
    problems: list[str] = []
    notes: list[str] = []
    for table in loaded.kind.tables:
        if table.name not in loaded.values:
            continue
        for command in table.commands:
            values = loaded.for_command(schema, table, command)
            keys = {n: schema.keys[table.name][n] for n in schema.command_keys[command.name]}
            missing = [k for n, k in keys.items() if k.required and n not in values]
            if missing:
                notes.append(f"'swarmota {command.name}' needs {', '.join(k.flag for k in missing)}"
                             " on its command line (not in the file)")
                continue
            if command.check is None:
                continue
            args = argparse.Namespace(**{n: values[n] if n in values else k.default_value()
                                         for n, k in keys.items()})
            try:
                command.check(args)
            except (ValueError, OSError) as exc:
                problems.append(f"{loaded.path}: [{table.name}] refused by 'swarmota "
                                f"{command.name}': {exc}")
    return problems, notes
