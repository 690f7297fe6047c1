"""Reading one YAML tree into the config's dataclasses, problem by problem.

``_Reader`` walks the tree and collects every problem with its key path
instead of stopping at the first; the ``_read_*`` functions read one
section each. config.py's ``parse_config`` puts them together.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import reprlib
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from .config_model import (DEFAULT_GPU_ROUTES, HTTP_METHODS, MAX_MIB, MAX_SECONDS,
                           BusyProbe, Call, ConsumerConfig, FreeVram, GpuRoute, ModelsFrom,
                           _normal_path)
from .presets import TYPES, with_preset
from .procs import PidsFrom

_MISSING = object()


# Sane bounds: a week for any duration, thousands for a queue, a TiB of VRAM.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 60, 60


def short(value: Any) -> str:
    """A value as a message shows it: its repr, in 80 characters at most."""
    text = _SHORT.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def listing(names: list[str]) -> str:
    text = ", ".join(names) or "none"
    return text if len(text) <= 80 else text[:77] + "..."


def key_path(path: str, key: Any) -> str:
    name = key if isinstance(key, str) else repr(key)
    name = name if len(name) <= 40 else name[:37] + "..."
    return f"{path}.{name}" if path else name


class _Reader:
    """Walks the YAML tree, collecting problems instead of stopping at the
    first. Each value is checked for its type and bounds.

    The null rule, everywhere: a key given as null is a key left out. An
    optional setting takes its default; a required one is a problem that
    says it is required."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def problem(self, path: str, expected: str, got: Any = _MISSING) -> None:
        path = path or "(top level)"
        if got is _MISSING:
            self.problems.append(f"{path}: {expected}")
        else:
            self.problems.append(f"{path}: expected {expected}, got {short(got)}")

    def section(self, node: Any, path: str, allowed: tuple[str, ...]) -> dict:
        if node is None:
            return {}
        if not isinstance(node, dict):
            self.problem(path, "a mapping", node)
            return {}
        for key in node:
            if key not in allowed:
                self.problem(key_path(path, key),
                             f"unknown key (allowed here: {', '.join(allowed)})")
        return node

    def integer(self, node: dict, key: str, path: str, default: Any, minimum: int = 0,
                what: str = "a whole number", maximum: int = MAX_MIB) -> Any:
        value = node.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) \
                or not minimum <= value <= maximum:
            self.problem(f"{path}.{key}", f"{what} from {minimum} to {maximum}", value)
            return default
        return value

    def seconds(self, node: dict, key: str, path: str, default: Any, positive: bool = True) -> Any:
        value = node.get(key)
        if value is None:
            return default
        ok = (not isinstance(value, bool) and isinstance(value, (int, float))
              and math.isfinite(value) and (0 < value if positive else 0 <= value)
              and value <= MAX_SECONDS)
        if not ok:
            self.problem(f"{path}.{key}", "a number of seconds " + ("> 0" if positive else ">= 0")
                         + f" and at most {MAX_SECONDS:g} (a week)", value)
            return default
        return float(value)

    def string(self, node: dict, key: str, path: str, default: Any,
               choices: tuple[str, ...] | None = None, required: bool = False) -> Any:
        value = node.get(key)
        if value is None:
            if required:
                self.problem(f"{path}.{key}", "a value (required; it is missing or null)")
            return default
        if not isinstance(value, str) or not value:
            self.problem(f"{path}.{key}", "a non-empty string", value)
            return default
        if choices and value not in choices:
            self.problem(f"{path}.{key}", "one of " + " | ".join(choices), value)
            return default
        return value

    def upstream_path(self, node: dict, key: str, path: str, default: Any,
                      required: bool = False) -> Any:
        value = self.string(node, key, path, default, required=required)
        if isinstance(value, str) and (not value.startswith("/") or not value.isascii()
                                       or any(c.isspace() or ord(c) < 32 for c in value)):
            self.problem(f"{path}.{key}", "an ASCII path starting with '/', without spaces",
                         value)
            return default
        return value

    def boolean(self, node: dict, key: str, path: str, default: bool) -> bool:
        value = node.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.problem(f"{path}.{key}", "true or false", value)
            return default
        return value

    def url(self, node: dict, key: str, path: str, required: bool = True) -> str | None:
        value = node.get(key)
        expected = "an http:// or https:// URL with a host, an optional port and no path"
        if value is None:
            if required:
                self.problem(f"{path}.{key}", expected + " (required)")
            return None
        if not isinstance(value, str):
            self.problem(f"{path}.{key}", expected, value)
            return None
        try:
            parts = urlsplit(value)
            port = parts.port             # ValueError on a port that is not a number
        except ValueError:
            parts, port = None, None
        if parts is None or parts.scheme not in ("http", "https") or not value.isascii() \
                or not HOST_RE.fullmatch(parts.netloc.rpartition("@")[2].rsplit(":", 1)[0]
                                         if not parts.netloc.endswith("]")
                                         else parts.netloc.rpartition("@")[2]) \
                or "@" in parts.netloc or parts.path not in ("", "/") or parts.query \
                or parts.fragment or (port is not None and not 0 < port < 65536):
            self.problem(f"{path}.{key}", expected, value)
            return None
        return value.rstrip("/")

    def bind(self, node: dict, key: str, path: str, default: str) -> str:
        value = self.string(node, key, path, default)
        if value.startswith("unix:") and len(value) > 5:
            return value
        host, _, port = value.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not (host and port.isdigit() and 0 <= int(port) < 65536
                and (HOST_RE.fullmatch(host) or ":" in host)):
            self.problem(f"{path}.{key}", "HOST:PORT (127.0.0.1:8770, [::1]:8770) or unix:PATH",
                         value)
            return default
        return value


def read_settings(r: _Reader, node: Any, path: str, cls: type, *, extra_keys: tuple = (),
                  **given: Any) -> Any:
    """One section of ``cls``: each field declared with ``setting()`` read
    by its kind, bounds and default; the rest from ``given`` (read by their
    own readers) or their defaults. Unknown keys are problems."""
    fields = dataclasses.fields(cls)
    node = r.section(node, path, tuple(f.name for f in fields
                                       if "setting" in f.metadata or f.name in given)
                     + extra_keys)
    values = dict(given)
    for f in fields:
        if "setting" not in f.metadata or f.name in given:
            continue
        kind, how = f.metadata["setting"]
        if kind == "url":
            values[f.name] = r.url(node, f.name, path, **how)
        else:
            values[f.name] = getattr(r, kind)(node, f.name, path, f.default, **how)
    return cls(**values)


def _read_call(r: _Reader, node: Any, path: str, default_method: str) -> Call | None:
    if node is None:
        return None
    if not isinstance(node, dict):
        r.problem(path, "a mapping like {method: POST, path: /api/unload}", node)
        return None
    node = r.section(node, path, ("method", "path", "json", "timeout_s", "command", "for_each",
                                  "until_empty", "until_freed"))
    method = r.string(node, "method", path, default_method, HTTP_METHODS)
    timeout = r.seconds(node, "timeout_s", path, Call.timeout_s)
    command = node.get("command")
    if command is not None:
        if node.get("path") is not None or node.get("for_each") is not None:
            r.problem(path, "either a command or a path (with for_each), not both")
            return None
        if not isinstance(command, list) or not command or \
                not all(isinstance(a, str) and a for a in command):
            r.problem(f"{path}.command", "a list like [systemctl, stop, whisper-server] "
                      "(run without a shell)", command)
            return None
        return Call(method=method, timeout_s=timeout, command=tuple(command))
    upath = r.upstream_path(node, "path", path, None, required=True)
    for_each = _read_models_from(r, node.get("for_each"), f"{path}.for_each")
    until_empty = r.boolean(node, "until_empty", path, False)
    if until_empty and for_each is None:
        r.problem(f"{path}.until_empty", "only with for_each (the list it waits to be empty)")
    if upath is None:
        return None
    until_freed = None
    freed = node.get("until_freed")
    if freed is not None:
        freed = r.section(freed, f"{path}.until_freed", ("path", "key", "held_key"))
        fpath = r.upstream_path(freed, "path", f"{path}.until_freed", None, required=True)
        fkey = r.string(freed, "key", f"{path}.until_freed", None, required=True)
        hkey = r.string(freed, "held_key", f"{path}.until_freed", None)
        until_freed = FreeVram(fpath, fkey, hkey) if fpath and fkey else None
    return Call(method=method, path=upath, json=node.get("json"), timeout_s=timeout,
                for_each=for_each, until_empty=until_empty, until_freed=until_freed)


def _read_models_from(r: _Reader, node: Any, path: str) -> ModelsFrom | None:
    if node is None:
        return None
    if not isinstance(node, dict):
        r.problem(path, "a mapping like {path: /api/ps, list: models, name: name}", node)
        return None
    found = read_settings(r, node, path, ModelsFrom)
    if (found.where is None) != (found.equals is None):
        r.problem(f"{path}.where", "where and equals together (a dotted key and the value "
                  "a loaded model has there)", node.get("where"))
    return found if found.path else None


def _read_busy(r: _Reader, node: Any, path: str) -> BusyProbe | None:
    if node is None:
        return None
    if not isinstance(node, dict):
        r.problem(path, "a mapping like {path: /queue, keys: [queue_running]}", node)
        return None
    node = r.section(node, path, ("path", "keys"))
    keys = node.get("keys")
    keys = [] if keys is None else keys     # null: left out
    if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
        r.problem(f"{path}.keys", "a list of JSON keys whose lists must be empty", keys)
        keys = []
    upath = r.upstream_path(node, "path", path, None, required=True)
    return BusyProbe(path=upath, keys=tuple(keys)) if upath else None


def _read_pids_from(r: _Reader, node: Any, path: str) -> PidsFrom | None:
    if node is None:
        return None
    expected = "a mapping with one of {port: 8188}, {pidfile: /run/x.pid}, {cmdline: main.py}"
    if not isinstance(node, dict) or len(node) != 1:
        r.problem(path, expected, node)
        return None
    node = r.section(node, path, ("port", "pidfile", "cmdline"))
    if "port" in node:
        port = r.integer(node, "port", path, None, 1, "a TCP port", 65535)
        return PidsFrom(port=port) if port is not None else None
    if "pidfile" in node:
        pidfile = r.string(node, "pidfile", path, None)
        return PidsFrom(pidfile=pidfile) if pidfile else None
    if "cmdline" in node:
        cmdline = r.string(node, "cmdline", path, None)
        return PidsFrom(cmdline=cmdline) if cmdline else None
    return None


def _read_strings(r: _Reader, node: Any, path: str, expected: str) -> tuple[str, ...]:
    """A list of names, compared without case (an origin without a final /)."""
    if node is None:
        return ()
    if not isinstance(node, list) or not all(isinstance(x, str) and x for x in node):
        r.problem(path, expected, node)
        return ()
    return tuple(x.strip().lower().rstrip("/") for x in node)


def _read_lock_file(r: _Reader, q: dict) -> str | None:
    value = r.string(q, "lock_file", "scheduler", None)
    if value is not None and (not value.startswith("/") or "\0" in value
                              or value.endswith("/") or os.path.isdir(value)):
        r.problem("scheduler.lock_file", "an absolute path to a file (not a directory)", value)
        return None
    return value


def _read_token(r: _Reader, s: dict) -> str | None:
    if "auth_token" in s and "auth_token_file" in s:
        r.problem("server.auth_token_file", "only one of auth_token and auth_token_file")
        return None
    if s.get("auth_token") is not None:
        token = r.string(s, "auth_token", "server", None)
    elif s.get("auth_token_file") is not None:
        name = r.string(s, "auth_token_file", "server", None)
        if name is None:
            return None
        try:
            with open(name, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            r.problem("server.auth_token_file", f"a readable file holding the token ({e})")
            return None
    else:
        return None
    if token is not None and (len(token) < 16 or not token.isascii() or not token.isprintable()
                              or " " in token):
        r.problem("server.auth_token" if "auth_token" in s else "server.auth_token_file",
                  "a token of at least 16 printable ASCII characters without spaces")
        return None
    return token


def _read_gpu_routes(r: _Reader, node: Any, path: str,
                     default: tuple[str, ...] | None = DEFAULT_GPU_ROUTES) -> tuple[GpuRoute, ...]:
    if node is None:
        node = list(default or ())
    if not isinstance(node, list):
        r.problem(path, 'a list like ["POST /prompt", "* /api/*"]', node)
        return ()
    routes = []
    for i, item in enumerate(node):
        parts = item.split() if isinstance(item, str) else []
        if len(parts) != 2 or (parts[0] != "*" and parts[0].upper() not in HTTP_METHODS) \
                or not (parts[1].startswith("/") or parts[1] == "*"):
            r.problem(f"{path}[{i}]", "'METHOD /path-pattern' (METHOD may be *; the "
                      "pattern may use * and ?)", item)
            continue
        # Patterns are matched against normalised paths (route_forms): normalise them alike.
        pattern = parts[1] if parts[1] == "*" else _normal_path(parts[1])
        routes.append(GpuRoute(parts[0].upper(), pattern))
    return tuple(routes)


MODEL_NAME_RE = re.compile(r"[^\s\x00-\x1f\x7f]{1,256}")     # a model name (or glob)


def _read_model_names(r: _Reader, node: Any, path: str) -> tuple[str, ...]:
    """A consumer's ``models``: names or globs (``qwen2.5:*``), null for none."""
    if node is None:
        return ()
    if not isinstance(node, list):
        r.problem(path, "a list of model names or globs", node)
        return ()
    out = []
    for i, name in enumerate(node):
        if not isinstance(name, str) or not MODEL_NAME_RE.fullmatch(name):
            r.problem(f"{path}[{i}]", "a model name or glob (1 to 256 characters, no spaces)",
                      name)
        else:
            out.append(name)
    return tuple(out)


def _read_gpus(r: _Reader, node: dict, path: str, devices: list[int]) -> tuple[int, ...]:
    """A consumer's ``gpu: N`` or ``gpus: [N, M]``: required with several GPUs."""
    one, several = node.get("gpu"), node.get("gpus")
    expected = (f"the index of a GPU in gpus ({', '.join(map(str, devices))})"
                if len(devices) > 1 else
                f"{devices[0]}, the one GPU's index (gpu.index; list several in gpus)")
    if one is not None and several is not None:
        r.problem(f"{path}.gpus", "gpu or gpus, not both")
        return tuple(devices[:1])
    if one is None and several is None:
        if len(devices) > 1:
            r.problem(f"{path}.gpu", f"{expected} (required with several GPUs: the GPU it "
                      "runs on, or gpus: [N, M] for one that spans several)")
        return tuple(devices[:1])
    if one is not None:
        if type(one) is not int or one not in devices:
            r.problem(f"{path}.gpu", expected, one)
            return tuple(devices[:1])
        return (one,)
    if not isinstance(several, list) or not several:
        r.problem(f"{path}.gpus", "a list of GPU indices", several)
        return tuple(devices[:1])
    found = []
    for i, index in enumerate(several):
        if type(index) is not int or index not in devices:
            r.problem(f"{path}.gpus[{i}]", expected, index)
        elif index in found:
            r.problem(f"{path}.gpus[{i}]", "a GPU not already listed", index)
        else:
            found.append(index)
    return tuple(sorted(found)) or tuple(devices[:1])


def _read_consumer(r: _Reader, name: str, node: Any, names: list[str],
                   devices: list[int]) -> ConsumerConfig | None:
    path = f"consumers.{name}"
    node = r.section(node, path, (
        "type", "url", "gpu", "gpus", "health", "paths", "vram_resident_mib", "can_coexist_with", "load",
        "unload", "busy", "gpu_routes", "not_gpu_routes", "vram_managed", "idle_unload_s",
        "read_timeout_s",
        "pids_from", "upstream_allow", "loaded_from", "models", "openai_base", "models_from"))
    preset = r.string(node, "type", path, "generic", TYPES)
    node = with_preset({**node, "type": preset})
    url = r.url(node, "url", path)
    health = r.upstream_path(node, "health", path, "/")
    paths = node.get("paths", {})
    if not isinstance(paths, dict):
        r.problem(f"{path}.paths", "a mapping of kind -> upstream path", paths)
        paths = {}
    good_paths = {}
    for kind, p in paths.items():
        if not isinstance(kind, str) or not NAME_RE.fullmatch(kind):
            r.problem(key_path(f"{path}.paths", kind), "a kind name (letters, digits, '.', '_', "
                      "'-')")
        elif r.upstream_path(paths, kind, f"{path}.paths", None, required=True) is not None:
            good_paths[kind] = p
    resident = r.integer(node, "vram_resident_mib", path, None, 0, "a whole number of MiB")
    if node.get("vram_resident_mib") is None:           # absent, or `null`
        r.problem(f"{path}.vram_resident_mib", f"a whole number of MiB from 0 to {MAX_MIB} "
                  "(required)")
    coexist = node.get("can_coexist_with")
    coexist = [] if coexist is None else coexist      # null: left out
    if not isinstance(coexist, list) or not all(isinstance(c, str) for c in coexist):
        r.problem(f"{path}.can_coexist_with", "a list of consumer names", coexist)
        coexist = []
    for i, other in enumerate(coexist):
        if other not in names:
            r.problem(f"{path}.can_coexist_with[{i}]",
                      f"the name of a consumer ({', '.join(names)})", other)
        elif other == name:
            r.problem(f"{path}.can_coexist_with[{i}]", "another consumer's name, not its own", other)
    idle = r.seconds(node, "idle_unload_s", path, None)
    read_timeout = r.seconds(node, "read_timeout_s", path, None)
    if idle is not None and node.get("unload") is None:
        r.problem(f"{path}.idle_unload_s", "no idle_unload_s without an unload route to call "
                  "(it could never take effect)")
    consumer = dict(
        load=_read_call(r, node.get("load"), f"{path}.load", "POST"),
        unload=_read_call(r, node.get("unload"), f"{path}.unload", "POST"),
        busy=_read_busy(r, node.get("busy"), f"{path}.busy"),
        gpu_routes=_read_gpu_routes(r, node.get("gpu_routes"), f"{path}.gpu_routes"),
        not_gpu_routes=_read_gpu_routes(r, node.get("not_gpu_routes"),
                                        f"{path}.not_gpu_routes", ()),
        vram_managed=r.boolean(node, "vram_managed", path, False),
        pids_from=_read_pids_from(r, node.get("pids_from"), f"{path}.pids_from"),
        upstream_allow=(None if node.get("upstream_allow") is None else _read_gpu_routes(
            r, node.get("upstream_allow"), f"{path}.upstream_allow", None)),
        loaded_from=_read_models_from(r, node.get("loaded_from"), f"{path}.loaded_from"),
        models=_read_model_names(r, node.get("models"), f"{path}.models"),
        openai_base=r.upstream_path(node, "openai_base", path, "/v1").rstrip("/"),
        models_from=_read_models_from(r, node.get("models_from"), f"{path}.models_from"),
        gpus=_read_gpus(r, node, path, devices),
        type=preset)
    if url is None or resident is None:
        return None
    return ConsumerConfig(
        name=name, url=url, health=health, paths=MappingProxyType(good_paths),
        vram_resident_mib=resident, can_coexist_with=tuple(coexist),
        idle_unload_s=idle, read_timeout_s=read_timeout, **consumer)
