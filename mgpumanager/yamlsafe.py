"""YAML read defensively: a config file is input, and input can attack.

Bounded in size (1 MiB), in the values it may expand to through aliases
(a "billion laughs" document), and in nesting depth; UTF-8 only; a key
given twice is an error naming both lines, not a silent last-one-wins.
"""

from __future__ import annotations

import yaml

from .errors import ConfigError

# What a config file may be: its size, and the values it may expand to
# (aliases included). A real config is a few KiB and a few hundred values.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_CONFIG_VALUES = 20_000
MAX_CONFIG_DEPTH = 64

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_Loader):
    """YAML's safe loader, refusing a key given twice (naming both lines)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a name, not a list or mapping",
                    key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


class _Level:
    """One open collection in the event walk: its size so far and where it is."""
    __slots__ = ("count", "anchor", "mapping", "want_key", "key", "index")

    def __init__(self, anchor, mapping: bool):
        self.count, self.anchor, self.mapping = 1, anchor, mapping
        self.want_key, self.key, self.index = True, None, 0

    def name(self) -> str | None:
        """The key path segment of the value being read in this collection."""
        return self.key if self.mapping else f"[{self.index}]"

    def value_done(self) -> None:
        if self.mapping:
            self.want_key = True
        else:
            self.index += 1


def _check_shape(text: str) -> None:
    """Refuse, from YAML's events alone, a document that nests too deeply or
    expands (through aliases) to too many values, before anything is built:
    a "billion laughs" costs nothing to reject this way. The error names the
    key path where the limit was passed."""
    sizes: dict[str, int] = {}            # anchor -> the number of values it expands to
    stack = [_Level(None, False)]

    def where() -> str:
        parts = [lvl.name() for lvl in stack[1:-1]] + (
            [stack[-1].name()] if len(stack) > 1 and not stack[-1].want_key else [])
        path = ""
        for part in parts:
            if part is None:
                continue
            part = str(part) if len(str(part)) <= 40 else str(part)[:37] + "..."
            path += part if part.startswith("[") or not path else "." + part
        return path or "(top level)"

    def add(n: int) -> None:
        stack[-1].count += n
        if sum(level.count for level in stack) > MAX_CONFIG_VALUES:
            raise _ShapeError(f"{where()}: more than {MAX_CONFIG_VALUES} values (aliases "
                              "expanded); a config has a few hundred")

    for event in yaml.parse(text, Loader=_Loader):
        top = stack[-1]
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            if top.mapping and top.want_key:
                raise _ShapeError(f"{where()}: a mapping key must be a name, not a list or "
                                  "mapping")
            top.want_key = False if top.mapping else top.want_key
            stack.append(_Level(event.anchor, isinstance(event, yaml.MappingStartEvent)))
            if len(stack) > MAX_CONFIG_DEPTH:
                raise _ShapeError(f"{where()}: values nested more than {MAX_CONFIG_DEPTH} deep")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            done = stack.pop()
            if done.anchor:
                sizes[done.anchor] = done.count
            stack[-1].value_done()
            add(done.count)
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor:
                sizes[event.anchor] = 1
            if top.mapping and top.want_key:
                top.key, top.want_key = event.value, False
            else:
                top.value_done()
            add(1)
        elif isinstance(event, yaml.AliasEvent):
            if top.mapping and top.want_key:
                top.want_key = False
            else:
                top.value_done()
            add(sizes.get(event.anchor, 1))


class _ShapeError(Exception):
    """A document YAML can read but no config could be: its message leads with the key path."""


def read_yaml(path: str):
    """The YAML document in ``path``, or ConfigError with what is wrong."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(path, [f"(file): cannot read it: {e.strerror or e}"]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(path, ["(file): larger than 1 MiB; a config is a few KiB"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(path, [f"(file): not UTF-8 text (byte {e.start}, line {line})"]) from None
    try:
        _check_shape(text)
        return yaml.load(text, Loader=_StrictLoader)
    except _ShapeError as e:
        raise ConfigError(path, [str(e)]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        problem = getattr(e, "problem", None) or str(e)
        if "nesting depth" in problem:
            problem = "values nested too deeply"
        raise ConfigError(path, [f"{where}: not valid YAML: {problem}"]) from None
    except RecursionError:
        raise ConfigError(path, ["(file): values nested too deeply"]) from None
