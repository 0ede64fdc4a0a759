"""Sparse autoencoders: one class per architecture, registered by name, one on-disk format."""

from e2edict.saes.base import SAE, Writes, registry
from e2edict.saes.gated import GatedSAE
from e2edict.saes.jumprelu import JumpReLUSAE
from e2edict.saes.matryoshka import MatryoshkaBatchTopKSAE
from e2edict.saes.relu import ReLUSAE
from e2edict.saes.saelens_format import load_sae, save_sae
from e2edict.saes.sparsify_format import load_sparsify
from e2edict.saes.topk import BatchTopKSAE, TopKSAE

__all__ = [
    "SAE",
    "BatchTopKSAE",
    "GatedSAE",
    "JumpReLUSAE",
    "MatryoshkaBatchTopKSAE",
    "ReLUSAE",
    "TopKSAE",
    "Writes",
    "load_sae",
    "load_sparsify",
    "registry",
    "save_sae",
]
