"""The method registry: each method declares its name, its settings and its authors' recipe
beside its code, and ``build_method`` passes exactly those settings to it (nothing swallowed).

A setting named ``alpha`` of a method with prefix ``pmr`` is the flag ``--pmr-alpha`` and the
YAML key ``pmr_alpha`` of the training scripts; here, and for a researcher calling
``build_method`` in their own loop, it is the keyword ``alpha``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from olmbalance.errors import UserError


@dataclass(frozen=True)
class Setting:
    """One knob of a method: its name (without prefix), type, default and one line of help."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple = ()

    def coerce(self, value: Any, method: str, flag: str) -> Any:
        try:
            if self.type is bool and isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                value = value.lower() in ("true", "1", "yes")
            else:
                value = self.type(value)
        except (TypeError, ValueError):
            raise UserError(f"{flag} of method {method} must be a {self.type.__name__}, got {value!r}") from None
        if self.choices and value not in self.choices:
            raise UserError(f"{flag} of method {method} must be one of: {', '.join(map(str, self.choices))}; "
                            f"got {value!r}")
        return value


@dataclass
class RunContext:
    """What a method may need to know about the run, besides its own settings: the loop's
    epoch length (methods that act per epoch count steps), the run's seed (noise generators),
    OLM's reference window and target scale (documented flags of the training scripts), and
    the run's optimizer recipe and epochs."""

    steps_per_epoch: int | None = None
    seed: int | None = None
    reference_steps: int = 1
    reference_tail: int | None = None
    target_scale: str = "reference"
    # The run's network-optimizer recipe and length, for methods that train copies of the model
    # the way the run trains it (G-Blending's super-epoch estimates).
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    loss_reduction: str = "mean"
    epochs: int | None = None


# Recipe keys a method's authors' recipe may set: the training scripts' general options.
RECIPE_KEYS = ("optimizer", "lr", "momentum", "weight_decay", "lr_step", "lr_gamma", "loss_reduction",
               "batch_size", "epochs")


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: its factory, settings and recipes.

    ``recipes["authors"]`` is what the method's authors ran (optimizer, learning rate, schedule,
    epochs, batch; ``"*"`` for every dataset, a dataset name for its own values, which may also
    set the method's settings by their prefixed keys). ``recipes["default"]``, when present, is
    what a run gets without ``--recipe``; without it, the dataset's recipe shared by all methods.
    """

    name: str
    factory: Callable[..., Any]
    prefix: str | None
    settings: tuple[Setting, ...]
    recipes: Mapping[str, Mapping[str, Mapping[str, Any]]]
    summary: str

    def key(self, setting: Setting) -> str:
        return f"{self.prefix}_{setting.name}"

    def flag(self, setting: Setting) -> str:
        return "--" + self.key(setting).replace("_", "-")

    def keys(self) -> dict[str, Setting]:
        """Prefixed key -> setting (``pmr_alpha`` -> alpha)."""
        return {self.key(s): s for s in self.settings}

    def recipe(self, choice: str, dataset: str) -> dict[str, Any]:
        """The options ``--recipe choice`` sets on ``dataset`` ("dataset" sets none)."""
        by_dataset = self.recipes.get(choice, {})
        return {**by_dataset.get("*", {}), **by_dataset.get(dataset, {})}


METHODS: dict[str, MethodEntry] = {}
CONTEXT_FIELDS = tuple(f.name for f in dataclasses.fields(RunContext))


def register_method(name: str, *, prefix: str | None = None, settings: Sequence[Setting] = (),
                    recipes: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None, summary: str = ""):
    """Decorator for ``factory(heads, context, **settings) -> Method``."""
    if settings and not prefix:
        raise ValueError(f"method {name!r} declares settings, so it needs a flag prefix")
    for choice, by_dataset in (recipes or {}).items():
        for values in by_dataset.values():
            stray = set(values) - set(RECIPE_KEYS) - {f"{prefix}_{s.name}" for s in settings}
            if stray:
                raise ValueError(f"method {name!r}'s {choice} recipe sets unknown keys {sorted(stray)}")

    def wrap(factory):
        METHODS[name] = MethodEntry(name, factory, prefix, tuple(settings), dict(recipes or {}),
                                    summary or (factory.__doc__ or "").strip().split("\n")[0])
        return factory
    return wrap


def method_entry(name: str) -> MethodEntry:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r} (--method); choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def setting_keys() -> dict[str, tuple[MethodEntry, Setting]]:
    """Every method's prefixed setting key -> (entry, setting); methods sharing a prefix share keys."""
    return {key: (entry, setting) for entry in METHODS.values() for key, setting in entry.keys().items()}


def build_method(name: str, heads: Sequence[str], settings: Mapping[str, Any] | None = None,
                 context: RunContext | None = None, **keywords):
    """A method ready to plug into a loop.

    ``settings`` (or keywords) name the method's own settings without prefix; keywords may also
    set ``RunContext`` fields. Anything else is refused in one sentence."""
    entry = method_entry(name)
    declared = {s.name: s for s in entry.settings}
    chosen = dict(settings or {})
    context = dataclasses.replace(context) if context is not None else RunContext()
    for key, value in keywords.items():
        if key in CONTEXT_FIELDS and key not in declared:
            setattr(context, key, value)
        else:
            chosen[key] = value
    unknown = sorted(set(chosen) - set(declared))
    if unknown:
        known = ", ".join(sorted(declared)) or "none"
        raise UserError(f"method {name} has no setting {', '.join(map(repr, unknown))}; its settings: {known}")
    values = {s.name: s.default for s in entry.settings}
    for key, value in chosen.items():
        setting = declared[key]
        values[key] = setting.coerce(value, name, entry.flag(setting))
    method = entry.factory(tuple(heads), context, **values)
    method.name = name
    return method

