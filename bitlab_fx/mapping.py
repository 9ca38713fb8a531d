"""QConfigMapping: which layers are quantized, and how.

Priority, lowest to highest: ``set_global`` < ``set_object_type`` (the most specific matching class wins:
the closest in the layer type's MRO; ties in insertion order) < ``set_module_name_regex`` (the first
matching pattern in insertion order wins) < ``set_module_name``. A config of ``None`` keeps the
matched layers in float. As in ``torch.ao``, ``set_module_name`` covers a module's whole subtree: a layer
without a rule of its own takes the rule of its nearest named ancestor (``set_module_name("encoder", None)``
keeps every layer under ``encoder`` float), ahead of patterns and types.

>>> import torch, bitlab_fx as bfx
>>> qc = (bfx.QConfigMapping().set_global(bfx.ternary())
...       .set_object_type(torch.nn.Conv2d, bfx.int8())
...       .set_module_name_regex(r".*head", None))
>>> cfg, rule = qc.resolve("blocks.0.fc1", torch.nn.Linear)
>>> rule
"global"
>>> cfg, rule = qc.resolve("lm_head", torch.nn.Linear)
>>> cfg is None, rule
(True, module_name_regex('.*head'))
"""
from __future__ import annotations

import copy
import importlib
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from .config import QuantConfig
from .errors import ConfigError


@dataclass(frozen=True)
class Rule:
    """One entry of a mapping; ``str(rule)`` is how summaries and warnings name it."""

    kind: str  # "global" | "object_type" | "module_name_regex" | "module_name"
    key: Any
    config: Optional[QuantConfig]

    def __repr__(self) -> str:
        if self.kind == "global":
            return '"global"'
        if self.kind == "object_type":
            return f"object_type({_qualname(self.key)})"
        return f"{self.kind}({self.key!r})"

    __str__ = __repr__


def _qualname(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or ""
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", repr(obj))
    if module.startswith("torch.nn.modules"):
        module = "torch.nn"
    return f"{module}.{name}" if module else name


def _import_qualname(path: str) -> Any:
    module, _, name = path.rpartition(".")
    try:
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"QConfigMapping.from_dict: cannot import object type {path!r}; "
                          "give a full dotted path such as 'torch.nn.Linear'") from None


def _type_distance(key: Any, object_type: Any) -> Optional[int]:
    """How far ``object_type`` is from the rule key ``key``: 0 for the same object, the position of ``key``
    in ``object_type``'s MRO for a subclass (smaller is more specific), None when it does not match."""
    if object_type is key:
        return 0
    if isinstance(key, type) and isinstance(object_type, type) and issubclass(object_type, key):
        return object_type.__mro__.index(key)
    return None


def _as_config(config: Any, where: str) -> Optional[QuantConfig]:
    if config is None or isinstance(config, QuantConfig):
        return config
    to_qconfig = getattr(config, "to_quant_config", None)  # seed-style BitQuantConfig
    if callable(to_qconfig):
        return to_qconfig()
    raise ConfigError(f"{where}: expected a bfx.QuantConfig (e.g. bfx.ternary()) or None, got {type(config).__name__}")


class QConfigMapping:
    """Rules that map each layer (by fully-qualified name and type) to a :class:`QuantConfig`."""

    def __init__(self):
        self._global: Optional[Rule] = None
        self._object_type: Dict[Any, Rule] = {}
        self._regex: List[Tuple[re.Pattern, Rule]] = []
        self._name: Dict[str, Rule] = {}
        self._claimed: frozenset = frozenset()  # rules matched outside the graph passes (embeddings)

    # -- building -------------------------------------------------------------------------------
    def set_global(self, config: Optional[QuantConfig]) -> "QConfigMapping":
        self._global = Rule("global", None, _as_config(config, "set_global"))
        return self

    def set_object_type(self, object_type: Union[type, Callable], config: Optional[QuantConfig]) -> "QConfigMapping":
        if not (isinstance(object_type, type) or callable(object_type)):
            raise ConfigError(f"set_object_type({object_type!r}): give a module class such as torch.nn.Linear "
                              "or a function such as torch.nn.functional.linear")
        self._object_type[object_type] = Rule("object_type", object_type,
                                              _as_config(config, f"set_object_type({_qualname(object_type)})"))
        return self

    def set_module_name_regex(self, pattern: str, config: Optional[QuantConfig]) -> "QConfigMapping":
        try:
            compiled = re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ConfigError(f"set_module_name_regex({pattern!r}): not a valid regular expression ({e})") from None
        self._regex = [(p, r) for p, r in self._regex if r.key != pattern]
        self._regex.append((compiled, Rule("module_name_regex", pattern, _as_config(config, f"set_module_name_regex({pattern!r})"))))
        return self

    def set_module_name(self, name: str, config: Optional[QuantConfig]) -> "QConfigMapping":
        if not isinstance(name, str):
            raise ConfigError(f"set_module_name({name!r}): the name must be a str such as 'layers.0.fc1'")
        self._name[name] = Rule("module_name", name, _as_config(config, f"set_module_name({name!r})"))
        return self

    # -- using ----------------------------------------------------------------------------------
    def rules(self) -> List[Rule]:
        """All rules, lowest priority first."""
        out = [self._global] if self._global is not None else []
        return out + list(self._object_type.values()) + [r for _, r in self._regex] + list(self._name.values())

    def _by_name(self, fqn: str) -> Optional[Rule]:
        """The ``set_module_name`` rule of ``fqn`` or, failing that, of its nearest ancestor."""
        if fqn in self._name:
            return self._name[fqn]
        name = fqn.rpartition(".")[0]
        while name:  # "" (the root) is not an ancestor: set_global covers the whole model
            if name in self._name:
                return self._name[name]
            name = name.rpartition(".")[0]
        return None

    def resolve(self, fqn: str, object_type: Any) -> Tuple[Optional[QuantConfig], Optional[Rule]]:
        """The config for the layer ``fqn`` of type ``object_type`` and the rule that chose it.

        Returns ``(None, None)`` when no rule applies (the layer stays float)."""
        rule = self._by_name(fqn)
        if rule is not None:
            return rule.config, rule
        for pattern, rule in self._regex:
            if pattern.fullmatch(fqn):
                return rule.config, rule
        rule = self._by_type((object_type,))
        if rule is not None:
            return rule.config, rule
        if self._global is not None:
            return self._global.config, self._global
        return None, None

    def resolve_explicit(self, fqn: str, object_type: Any) -> Tuple[Optional[QuantConfig], Optional[Rule]]:
        """Like :meth:`resolve`, but only rules that name this very module: its own ``set_module_name``, a
        pattern, its type; never an ancestor's name or the global default (embeddings use this)."""
        if fqn in self._name:
            return self._name[fqn].config, self._name[fqn]
        for pattern, rule in self._regex:
            if pattern.fullmatch(fqn):
                return rule.config, rule
        rule = self._by_type((object_type,))
        return (rule.config, rule) if rule is not None else (None, None)

    def with_claimed(self, rules) -> "QConfigMapping":
        """A copy (same rules) that counts ``rules`` as used when warning about rules that matched nothing."""
        twin = copy.copy(self)
        twin._claimed = frozenset(getattr(self, "_claimed", ())) | frozenset(rules)
        return twin

    def matching_rules(self, fqn: Optional[str], object_types: Tuple[Any, ...]) -> List[Rule]:
        """The rules other than the global one that match, highest priority first: by name and pattern
        (only when ``fqn`` is given), then by any of ``object_types``. Used for non-layer nodes (activations)."""
        out: List[Rule] = []
        if fqn is not None:
            named = self._by_name(fqn)
            if named is not None and (named.key == fqn or named.config is None or named.config.output is not None):
                out.append(named)  # an ancestor's layer config (weights/inputs) says nothing about this node
            out += [rule for pattern, rule in self._regex if pattern.fullmatch(fqn)]
        return out + self._by_type(object_types, every=True)

    def _by_type(self, object_types: Tuple[Any, ...], every: bool = False):
        """The ``set_object_type`` rule for the most specific of its keys that ``object_types`` match (closest
        in the MRO; ties in insertion order), or with ``every``, all matching rules in that order."""
        found = []
        for i, (t, rule) in enumerate(self._object_type.items()):
            d = [x for x in (_type_distance(t, o) for o in object_types) if x is not None]
            if d:
                found.append((min(d), i, rule))
        found.sort(key=lambda f: f[:2])
        if every:
            return [rule for _, _, rule in found]
        return found[0][2] if found else None

    def warn_unused(self, used: set) -> None:
        """Warn once for each rule that matched no layer (usually a typo in a name or pattern)."""
        for rule in self.rules():
            if rule not in used and rule not in getattr(self, "_claimed", ()) and rule.kind != "global":
                warnings.warn(f"bitlab_fx: QConfigMapping rule {rule} matched no layer of the model (or only layers "
                              "that a higher-priority rule decided: a set_module_name on the layer or an ancestor, an "
                              "earlier pattern); check the name/pattern against bfx.summary(model) or the model's "
                              "named_modules()", UserWarning, stacklevel=3)

    # -- (de)serialising ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-friendly dict that :meth:`from_dict` reads back (so a mapping can live in a config file)."""
        cfg = lambda r: None if r.config is None else r.config.to_dict()
        return {
            "global": None if self._global is None else cfg(self._global),
            "has_global": self._global is not None,
            "object_type": [[_qualname(t), cfg(r)] for t, r in self._object_type.items()],
            "module_name_regex": [[r.key, cfg(r)] for _, r in self._regex],
            "module_name": [[n, cfg(r)] for n, r in self._name.items()],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "QConfigMapping":
        if not isinstance(d, dict):
            raise ConfigError(f"QConfigMapping.from_dict expects a dict, got {type(d).__name__}")
        unknown = set(d) - {"global", "has_global", "object_type", "module_name_regex", "module_name"}
        if unknown:
            raise ConfigError(f"QConfigMapping.from_dict: unknown key(s) {sorted(unknown)}")
        cfg = lambda c: None if c is None else QuantConfig.from_dict(c)
        m = cls()
        if d.get("has_global", d.get("global") is not None):
            m.set_global(cfg(d.get("global")))
        for path, c in d.get("object_type", []):
            m.set_object_type(_import_qualname(path), cfg(c))
        for pattern, c in d.get("module_name_regex", []):
            m.set_module_name_regex(pattern, cfg(c))
        for name, c in d.get("module_name", []):
            m.set_module_name(name, cfg(c))
        return m

    def __repr__(self) -> str:
        lines = [f"  {r} -> {None if r.config is None else r.config.describe()}" for r in self.rules()]
        return "QConfigMapping(\n" + "\n".join(lines) + "\n)" if lines else "QConfigMapping()"


def as_mapping(qconfig: Any) -> QConfigMapping:
    """Accept a QConfigMapping, a single QuantConfig (applied globally) or a seed-style BitQuantConfig."""
    if isinstance(qconfig, QConfigMapping):
        return qconfig
    if qconfig is None:
        raise ConfigError("prepare_qat(model, qconfig=None): give a QConfigMapping or a config such as bfx.ternary()")
    return QConfigMapping().set_global(_as_config(qconfig, "prepare_qat(qconfig=...)"))
