"""Your own modules as models: ``arch: package.module:function``, trusted explicitly.

An arch of that form names an importable callable that returns an ``nn.Module``
classifier. It is called with ``num_classes`` and, when its signature takes them,
``in_channels`` and ``image_size``, plus the entry's ``model_kwargs``.

Naming such an arch in a config, a sweep spec or an ensemble manifest would make
reading that file import and run code, and nothing cdfkd reads from a file executes
code. So a module is imported only once its caller has *trusted* it: the command line's
``--trust MODULE`` (``cdfkd teachers import --arch`` trusts the module it is given),
or :func:`trust_modules` / :func:`trusting` from Python. Trusting ``my_package`` trusts
its submodules. Untrusted, unimportable, missing or misbehaving builders are refused
with the fix.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import re
from collections.abc import Callable, Iterator, Mapping

from torch import nn

from cdfkd.errors import ConfigError

_ARCH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_TRUSTED: set[str] = set()


class UntrustedCodeError(ConfigError):
    """An arch names a module the caller has not trusted; the message says how to."""


def is_user_arch(arch: str) -> bool:
    """Whether ``arch`` has the form ``package.module:function``."""
    return bool(_ARCH.match(arch))


def arch_module(arch: str) -> str:
    """``my_package.models`` of ``my_package.models:build_net``."""
    return arch.partition(":")[0]


def trust_modules(*modules: str) -> None:
    """Allow this process to import the builders of ``modules`` (and their submodules)."""
    for m in modules:
        if not re.match(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$", m):
            raise ValueError(f"--trust {m!r}: give a module path such as my_package.models")
        _TRUSTED.add(m)


@contextlib.contextmanager
def trusting(*modules: str) -> Iterator[None]:
    """Trust ``modules`` inside the block only."""
    before = set(_TRUSTED)
    trust_modules(*modules)
    try:
        yield
    finally:
        _TRUSTED.clear()
        _TRUSTED.update(before)


def is_trusted(module: str) -> bool:
    return any(module == t or module.startswith(t + ".") for t in _TRUSTED)


def resolve_builder(arch: str) -> Callable[..., nn.Module]:
    """The callable ``arch`` names, imported only when its module is trusted."""
    if not is_user_arch(arch):
        raise ValueError(f"arch {arch!r} must look like package.module:function")
    module_name, _, fn_name = arch.partition(":")
    if not is_trusted(module_name):
        raise UntrustedCodeError(
            f"arch {arch!r} names code to import and run, and cdfkd runs no code that a config "
            f"or manifest names unless you trust it: add --trust {module_name} to the command "
            f"(from Python: cdfkd.models.trust_modules({module_name!r}))"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ConfigError(
            f"arch {arch!r}: module {module_name} cannot be imported ({err}); install its "
            "package (pip install -e PATH) or put the folder holding it on PYTHONPATH"
        ) from None
    except Exception as err:
        raise ConfigError(
            f"arch {arch!r}: importing {module_name} failed ({type(err).__name__}: {err}); fix "
            "the module so that it imports"
        ) from None
    builder = getattr(module, fn_name, None)
    if not callable(builder):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ConfigError(
            f"arch {arch!r}: {module_name} has no callable {fn_name!r} "
            f"(its callables: {', '.join(found) or 'none'})"
        )
    return builder


def build_user_model(
    arch: str, num_classes: int, in_channels: int, image_size: int, **kwargs
) -> nn.Module:
    """Call ``arch``'s builder with the geometry it declares and ``kwargs``; check the result."""
    builder = resolve_builder(arch)
    params: Mapping[str, inspect.Parameter]
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # a builtin or C callable: pass what is asked for
        params = {}
    any_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    offered = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    geometry = {k: v for k, v in offered.items() if any_kw or k in params}
    if "num_classes" not in geometry:
        raise ConfigError(
            f"arch {arch!r}: the builder must take num_classes (the dataset's class count); "
            "add a num_classes parameter"
        )
    clash = sorted(set(kwargs) & set(offered))
    if clash:
        raise ConfigError(f"arch {arch!r}: {clash} come from the dataset; leave them out of kwargs")
    call = ", ".join(f"{k}={v!r}" for k, v in {**geometry, **kwargs}.items())
    try:
        model = builder(**geometry, **kwargs)
    except Exception as err:
        raise ConfigError(
            f"{arch}({call}) failed ({type(err).__name__}: {err}); check the builder and the "
            "model_kwargs it is given"
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"{arch}({call}) returned a {type(model).__name__}, not a torch.nn.Module: the "
            "builder must return the model"
        )
    return model
