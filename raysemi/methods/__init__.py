"""The seven strategies, one module each, registered by name (with aliases)."""

from raysemi.methods.base import Strategy
from raysemi.methods.registry import (create_method, get_method, list_methods, method_kwargs, register_method,
                                      resolve_method_list, resolve_method_name)
from raysemi.methods import (supervised, mean_teacher, uncertainty_aware_mean_teacher,  # noqa: E402,F401
                             interpolation_consistency, entropy_minimization, pyramid_consistency, adversarial)

__all__ = ["Strategy", "create_method", "get_method", "list_methods", "method_kwargs", "register_method",
           "resolve_method_list", "resolve_method_name"]
