"""Sparse autoencoders: one class per architecture, registered by name, one on-disk format."""

from e2edict.saes.base import SAE, build_sae, load_sae, registry, save_sae
from e2edict.saes.relu import ReLUSAE

__all__ = ["SAE", "ReLUSAE", "build_sae", "load_sae", "registry", "save_sae"]
