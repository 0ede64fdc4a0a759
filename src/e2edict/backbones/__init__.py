"""Model families behind one small interface (see `base.Backbone`)."""

from e2edict.backbones.base import Backbone
from e2edict.backbones.huggingface import HFBackbone, load_hf_causal_lm
from e2edict.backbones.transformer_lens import TLBackbone, load_hooked_transformer

__all__ = ["Backbone", "HFBackbone", "TLBackbone", "load_hf_causal_lm", "load_hooked_transformer"]
