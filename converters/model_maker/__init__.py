"""The model maker: GGUF files of real models' shapes (or tiny ones of every family) with random
weights, a borrowed real tokenizer and llama.cpp's type mix. scripts/make_model.py is its CLI."""

from .make import UnknownShape, make_model, shape_by_name
from .router_skew import SKEWS, UnknownSkew
from .shapes import SHAPES, Shape
from .type_mix import FILE_TYPES

__all__ = ["FILE_TYPES", "SHAPES", "SKEWS", "Shape", "UnknownShape", "UnknownSkew", "make_model", "shape_by_name"]
