"""The plugin manager and the registry of what plugins provide.

Load order: mltl's built-ins first (``mltl.builtins``), then installed distributions' entry points in
group ``mltl``, each loaded once, lazily (the first time something asks for the registry). Set
``MLTL_LOAD_PLUGINS`` to a comma-separated list of distribution names to load only those (an empty value
loads none but the built-ins). After loading, ``check_pending()`` makes a misspelled hook fail at once.

Core code never calls ``pm.hook.*`` itself: what plugins provide goes through :class:`Registry`, every other
hook through the typed methods of :func:`hooks` (one method per hook of :mod:`mltl.hookspecs`).
"""

from __future__ import annotations

import inspect
import os
import types
import typing
import warnings
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from typing import Any

import attrs
import pluggy

from . import hookspecs
from .errors import ConfigError, UserError, did_you_mean

ENTRY_POINT_GROUP = "mltl"
KINDS = ("domain", "backbone", "freeze policy", "reporter")


@attrs.frozen
class Registered:
    """One thing a plugin provides: its kind, name, factory, the plugin that registered it, and the
    keyword arguments it was registered with.

    ``read_file`` and ``suffixes`` (domains only): how ``mltl predict`` reads one new file, and which file
    endings it searches a folder for (None: the image-folder domain's). ``opt_in`` (reporters only): used
    only when named in ``[run] reporters``, not by default.
    """

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    description: str = ""
    read_file: Callable[..., Any] | None = None
    suffixes: frozenset[str] | None = None
    opt_in: bool = False


@attrs.frozen
class PluginInfo:
    name: str
    distribution: str  # "" for built-ins and in-process plugins
    version: str
    hooks: tuple[str, ...]


_pm: pluggy.PluginManager | None = None
_registry: Registry | None = None
_distributions: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("mltl")
    pm.add_hookspecs(hookspecs)
    return pm


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with built-ins and entry points loaded (once)."""
    global _pm
    if _pm is None:
        from . import builtins

        pm = _new_manager()
        pm.register(builtins, name="mltl.builtins")
        _load_entry_points(pm)
        pm.check_pending()
        _pm = pm
    return _pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    wanted = os.environ.get("MLTL_LOAD_PLUGINS")
    allowed = None if wanted is None else {w.strip() for w in wanted.split(",") if w.strip()}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else ""
        if allowed is not None and dist not in allowed and ep.name not in allowed:
            continue
        if pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party install must not hide which one it is
            raise UserError(
                f'plugin "{ep.name}" from distribution "{dist}" failed to import: {exc}; '
                f"reinstall or uninstall it, or exclude it with MLTL_LOAD_PLUGINS"
            ) from exc
        pm.register(plugin, name=ep.name)
        _distributions[ep.name] = (dist, ep.dist.version if ep.dist is not None else "")


def register_plugin(plugin: object, name: str | None = None) -> None:
    """Register a plugin in this process, without an entry point (notebooks, tests).

    ``plugin`` is a module or an object with :data:`mltl.hookimpl` functions.
    """
    global _registry
    pm = get_plugin_manager()
    pm.register(plugin, name=name)
    pm.check_pending()
    _registry = None  # rebuilt on next use, now including this plugin


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered with :func:`register_plugin`."""
    global _registry
    get_plugin_manager().unregister(name=name)
    _registry = None


def reset() -> None:
    """Forget the loaded plugins; the next use loads them again (tests use this)."""
    global _pm, _registry
    _pm = None
    _registry = None
    _distributions.clear()


def plugin_infos() -> list[PluginInfo]:
    """Each loaded plugin, its distribution and version, and the hooks it implements."""
    from .version import __version__

    pm = get_plugin_manager()
    infos = []
    for name, plugin in pm.list_name_plugin():
        hooks = tuple(sorted(h.name for h in pm.get_hookcallers(plugin) or ()))
        if name == "mltl.builtins":
            dist, version = "mltl", __version__
        else:
            dist, version = _distributions.get(name, ("", ""))
        infos.append(PluginInfo(name=name, distribution=dist, version=version, hooks=hooks))
    return infos


class Registry:
    """Domains, backbones, freeze policies and reporters by name, collected from every plugin."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._items: dict[str, dict[str, Registered]] = {kind: {} for kind in KINDS}
        hooks = (
            ("domain", pm.hook.register_domains),
            ("backbone", pm.hook.register_backbones),
            ("freeze policy", pm.hook.register_freeze_policies),
            ("reporter", pm.hook.register_reporters),
        )
        for kind, hook in hooks:
            for impl in hook.get_hookimpls():
                impl.function(register=self._registrar(kind, impl.plugin_name))

    def _registrar(self, kind: str, plugin: str) -> Callable[..., None]:
        def register(name: str, factory: Callable[..., Any], description: str = "", *,
                     read_file: Callable[..., Any] | None = None, suffixes: Iterable[str] | None = None,
                     opt_in: bool | None = None) -> None:
            if not isinstance(name, str) or not name:
                raise TypeError(f"plugin {plugin!r} registered a {kind} without a name")
            if not callable(factory):
                raise TypeError(f"plugin {plugin!r} registered {kind} {name!r} with a non-callable")
            existing = self._items[kind].get(name)
            if existing is not None:
                raise UserError(
                    f'{kind} "{name}" is registered twice, by plugins "{existing.plugin}" and "{plugin}"; '
                    f"uninstall one, or restrict loading with MLTL_LOAD_PLUGINS"
                )
            what = f"plugin {plugin!r}, {kind} {name!r}"
            if kind != "domain" and (read_file is not None or suffixes is not None):
                raise TypeError(f"{what}: read_file and suffixes are for domains only")
            if kind != "reporter" and opt_in is not None:
                raise TypeError(f"{what}: opt_in is for reporters only")
            if kind == "domain":
                read_file, suffixes = _domain_reader(what, factory, read_file, suffixes)
            if kind == "reporter" and opt_in is None:
                opt_in = _deprecated_attribute(what, factory, "opt_in", "opt_in=True", stacklevel=3)
            description = description or (inspect.getdoc(factory) or "").split("\n")[0]
            self._items[kind][name] = Registered(kind, name, factory, plugin, description, read_file=read_file,
                                                 suffixes=suffixes, opt_in=bool(opt_in))

        return register

    def names(self, kind: str) -> list[str]:
        return sorted(self._items[kind])

    def all(self, kind: str) -> list[Registered]:
        return [self._items[kind][n] for n in self.names(kind)]

    def get(self, kind: str, name: str, *, key: str = "", source: str = "") -> Registered:
        """The registered thing, or a :class:`ConfigError` naming the key and the closest valid name."""
        try:
            return self._items[kind][name]
        except KeyError:
            raise ConfigError(
                f'unknown {kind} "{name}"{did_you_mean(name, self._items[kind])} '
                f"(`mltl plugins` lists what is installed)",
                key=key,
                source=source,
            ) from None

    def create(self, kind: str, name: str, options: dict[str, Any], *, key: str = "", source: str = "",
               extra: dict[str, Any] | None = None) -> Any:
        """Call the factory registered as ``name`` with ``options`` checked against its signature.

        ``extra`` holds values mltl supplies (e.g. ``image_size``); each is passed only when the factory
        declares a parameter of that name, and a config cannot set it.
        """
        item = self.get(kind, name, key=key, source=source)
        extra = extra or {}
        kwargs = check_options(item.factory, options, key=key, source=source, reserved=set(extra))
        params = inspect.signature(item.factory).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        kwargs.update({k: v for k, v in extra.items() if k in params or takes_any})
        try:
            return item.factory(**kwargs)
        except ConfigError:
            raise
        except UserError as exc:  # say which config key led there
            raise ConfigError(str(exc), key=key, source=source) from None


def _deprecated_attribute(what: str, obj: Any, attribute: str, keyword: str, stacklevel: int) -> Any:
    """``obj.attribute`` (None when absent), a deprecated stand-in for a registration argument; when set,
    a :class:`DeprecationWarning` pointing ``stacklevel`` frames up, at the plugin's ``register`` call."""
    value = getattr(obj, attribute, None)
    if value is not None:
        warnings.warn(f"{what}: the {attribute!r} attribute is deprecated and will stop working in the next "
                      f"release; pass register(..., {keyword}) instead", DeprecationWarning, stacklevel=stacklevel)
    return value


def _domain_reader(what: str, factory: Callable[..., Any], read_file: Callable[..., Any] | None,
                   suffixes: Iterable[str] | None) -> tuple[Callable[..., Any] | None, frozenset[str] | None]:
    """A domain's ``read_file`` and ``suffixes`` checked, from the registration arguments or, deprecated,
    from attributes of the factory (``factory.read_file``) and the reader (``read_file.suffixes``)."""
    if read_file is None:
        read_file = _deprecated_attribute(what, factory, "read_file", "read_file=...", stacklevel=4)
    if read_file is not None and not callable(read_file):
        raise TypeError(f"{what}: read_file must be callable, got {type(read_file).__name__}")
    if suffixes is None and read_file is not None:
        suffixes = _deprecated_attribute(what, read_file, "suffixes", "suffixes=(...)", stacklevel=4)
    if suffixes is None:
        return read_file, None
    if read_file is None:
        raise TypeError(f"{what}: suffixes say which files read_file reads; pass read_file too")
    if isinstance(suffixes, str) or not all(isinstance(s, str) for s in suffixes):
        raise TypeError(f"{what}: suffixes must be a collection of file endings such as (\".dcm\", \"\"), "
                        f"got {suffixes!r}")
    return read_file, frozenset(s.lower() for s in suffixes)


def get_registry() -> Registry:
    """The registry built from every loaded plugin (built once, rebuilt after :func:`register_plugin`)."""
    global _registry
    if _registry is None:
        _registry = Registry(get_plugin_manager())
    return _registry


class Hooks:
    """The hooks of :mod:`mltl.hookspecs` other than ``register_*``, as typed calls: the run events (every
    plugin hears them; under torchrun on rank 0 only, so a plugin that writes a file or posts a message does
    it once, not once per GPU) and the report hooks (each returns every plugin's non-None answer)."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._pm = pm

    def _events(self) -> Any:
        from .training import distributed

        return self._pm.hook if distributed.is_writer() else None

    def run_started(self, config: Any, run_dir: Any) -> None:
        if hook := self._events():
            hook.mltl_run_started(config=config, run_dir=run_dir)

    def stage_started(self, stage_name: str, stage_dir: Any) -> None:
        if hook := self._events():
            hook.mltl_stage_started(stage_name=stage_name, stage_dir=stage_dir)

    def epoch_ended(self, stage_name: str, variant: str, epoch: int, metrics: dict[str, Any]) -> None:
        if hook := self._events():
            hook.mltl_epoch_ended(stage_name=stage_name, variant=variant, epoch=epoch, metrics=metrics)

    def stage_finished(self, result: Any) -> None:
        if hook := self._events():
            hook.mltl_stage_finished(result=result)

    def run_finished(self, results: list[Any], run_dir: Any) -> None:
        if hook := self._events():
            hook.mltl_run_finished(results=results, run_dir=run_dir)

    def report_stage(self, result: Any) -> list[Any]:
        return [a for a in self._pm.hook.mltl_report_stage(result=result) if a is not None]

    def report_run(self, results: list[Any], run_dir: Any) -> list[Any]:
        return [a for a in self._pm.hook.mltl_report_run(results=results, run_dir=run_dir) if a is not None]

    def comparison_figures(self, chains: list[Any], out_dir: Any) -> list[Any]:
        return [a for a in self._pm.hook.mltl_comparison_figures(chains=chains, out_dir=out_dir) if a is not None]

    def register(self, plugin: object, name: str) -> None:
        """A plugin for a while (a run's reporters); :meth:`unregister` removes it."""
        self._pm.register(plugin, name=name)

    def unregister(self, plugin: object) -> None:
        self._pm.unregister(plugin)


def hooks() -> Hooks:
    """The typed hook caller of the current plugin manager."""
    return Hooks(get_plugin_manager())


_PLAIN_TYPES: dict[Any, tuple[type, ...]] = {
    int: (int,),
    float: (int, float),
    str: (str,),
    bool: (bool,),
    list: (list, tuple),
    tuple: (list, tuple),
    dict: (dict,),
}


def _accepted_types(annotation: Any) -> tuple[type, ...] | None:
    """The Python types a TOML value may have for ``annotation``; None when we cannot tell."""
    if annotation in _PLAIN_TYPES:
        return _PLAIN_TYPES[annotation]
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return (list, tuple)
    if origin is dict:
        return (dict,)
    if origin in (typing.Union, types.UnionType):
        accepted: list[type] = []
        for arg in typing.get_args(annotation):
            if arg is type(None):
                accepted.append(type(None))
                continue
            sub = _accepted_types(arg)
            if sub is None:
                return None
            accepted.extend(sub)
        return tuple(accepted)
    if origin is typing.Literal:
        return tuple({type(a) for a in typing.get_args(annotation)})
    return None


#: arguments the core passes to a factory itself (not config options), by kind
RESERVED_OPTIONS = {"domain": ("image_size",), "backbone": ("in_chans", "image_size")}


@attrs.frozen
class OptionInfo:
    """One config option of a registered factory, for ``mltl plugins NAME`` and generated docs."""

    name: str
    type: str  # as written in the factory's signature, e.g. "int | None"
    default: str  # repr of the default, or "required"


def describe_options(factory: Callable[..., Any], reserved: Iterable[str] = ()) -> list[OptionInfo]:
    """The keyword options a factory accepts (what :func:`check_options` checks), in signature order."""
    reserved = set(reserved)
    try:
        hints = typing.get_type_hints(factory)
    except Exception:  # noqa: BLE001 - a third-party annotation may fail to resolve in any way
        hints = {}
    out = []
    for name, p in inspect.signature(factory).parameters.items():
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) or name in reserved:
            continue
        annotation = hints.get(name, p.annotation)
        if annotation is p.empty:
            kind = "any"
        elif isinstance(annotation, type):
            kind = annotation.__name__
        else:
            kind = str(annotation).replace("typing.", "").replace("NoneType", "None")
        out.append(OptionInfo(name, kind, "required" if p.default is p.empty else repr(p.default)))
    return out


def check_options(factory: Callable[..., Any], options: dict[str, Any], *, key: str = "", source: str = "",
                  reserved: Iterable[str] = ()) -> dict[str, Any]:
    """Check config options against a factory's keyword parameters; return them as keyword arguments."""
    reserved = set(reserved)
    sig = inspect.signature(factory)
    try:
        hints = typing.get_type_hints(factory)
    except Exception:  # noqa: BLE001 - a third-party annotation may fail to resolve in any way
        hints = {}
    params = {
        n: p for n, p in sig.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in reserved
    }
    takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    prefix = f"{key}." if key else ""
    for name, value in options.items():
        if name not in params:
            if takes_any:
                continue
            raise ConfigError(f"unknown option{did_you_mean(name, params)}", key=prefix + name, source=source)
        annotation = hints.get(name, params[name].annotation)
        accepted = _accepted_types(annotation)
        bad_bool = isinstance(value, bool) and bool not in (accepted or ()) and accepted is not None
        if accepted is not None and (bad_bool or not isinstance(value, accepted)):
            want = " or ".join(sorted({t.__name__ for t in accepted}))
            raise ConfigError(
                f"expected {want}, got {type(value).__name__} {value!r}", key=prefix + name, source=source
            )
        if typing.get_origin(annotation) is typing.Literal and value not in typing.get_args(annotation):
            choices = [str(a) for a in typing.get_args(annotation)]
            raise ConfigError(f"{value!r} is not allowed{did_you_mean(str(value), choices)}",
                              key=prefix + name, source=source)
    missing = [n for n, p in params.items() if p.default is p.empty and n not in options]
    if missing:
        raise ConfigError(f'missing required option "{missing[0]}"', key=key, source=source)
    return dict(options)
