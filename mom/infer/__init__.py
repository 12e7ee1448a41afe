"""MoM's inference engine: static cache, one-token decode step, C++ kernels, generate (see engine.py).

``mom.model`` keeps the reference forward that every path here is tested against.
"""

from mom.infer.cache import StaticCache
from mom.infer.engine import Engine, engine_for
from mom.infer.generate import generate

__all__ = ["Engine", "StaticCache", "engine_for", "generate"]
