"""Apache TVM export: compile an IntModel for a target, bit-exact with the simulator."""

from export.build import CompiledModel, compile_model, export_library, load, resolve_target
from export.lower import lower

__all__ = ["CompiledModel", "compile_model", "export_library", "load", "lower", "resolve_target"]
