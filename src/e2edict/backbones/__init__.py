"""Model families behind one small interface (see `base.Backbone`)."""

from e2edict.backbones.base import Backbone
from e2edict.backbones.transformer_lens import TLBackbone, load_hooked_transformer

__all__ = ["Backbone", "TLBackbone", "load_hooked_transformer"]
