"""Sparse dictionaries: sparse autoencoders and transcoders, trained and scored on activation tensors.

Shared by both wings: nothing here knows of CNNs or language models. A wing adapts its activations (a CNN
stage's channel vector per position, a transformer's ``hook_resid_post``) to ``[N, d]`` tensors and calls:

- :class:`DictionaryConfig`, :class:`SparseDictionary` (config.py, sae.py): relu, topk, batchtopk, jumprelu;
  SAEs and (skip) transcoders.
- :func:`train`, :class:`TrainConfig`, :class:`TrainResult` (train.py): seeded, checkpointed, resumable,
  data-parallel.
- metrics.py: L0, MSE, explained variance (against the mean), cosine, l2 ratio, dead/dense latents,
  :class:`StreamingMetrics`, :func:`evaluate`, and the spliced-in effects (CE loss / KL / accuracy recovered).
- :func:`save_saelens`, :func:`load_saelens` (saelens_format.py): SAELens' directory layout.
- :func:`harvest`, :func:`harvest_many`, :class:`ActivationReader` (store.py): a sharded, shuffled, resumable
  activation store (several stores from one pass with ``harvest_many``).
- :class:`LatentCollector`, :func:`latent_summary` (latents.py): the nonzero latents of a sample and each latent's
  dashboard numbers (top rows, quantile-band samples, histogram, density).
- :func:`train_from_store`, :class:`DictionaryTraining` (staged.py): training from a store with checkpoints in
  ``OUT.partial`` (both wings' ``sae train``).
- parallel.py: joining ``torchrun``'s process group, gathering harvested rows over ranks.
- :func:`planted_features`, :func:`recovery`, :func:`mmcs`, :func:`mcc` (synthetic.py): ground-truth tests.
"""

from mechscope.core.dictionaries.config import ARCHITECTURES, DictionaryConfig
from mechscope.core.dictionaries.latents import LatentActivations, LatentCollector, LatentSummary, latent_summary
from mechscope.core.dictionaries.metrics import (
    DictionaryMetrics,
    StreamingMetrics,
    accuracy_recovered,
    ce_loss_recovered,
    cosine_similarity,
    evaluate,
    explained_variance,
    kl_divergence,
    kl_recovered,
    l0,
    l2_ratio,
    mse,
)
from mechscope.core.dictionaries.sae import DictionaryOutput, SparseDictionary
from mechscope.core.dictionaries.saelens_format import LoadedDictionary, load_saelens, save_saelens
from mechscope.core.dictionaries.staged import DictionaryTraining, train_from_store
from mechscope.core.dictionaries.store import ActivationReader, HarvestResult, harvest, harvest_many, stored_rows
from mechscope.core.dictionaries.synthetic import PlantedFeatures, RecoveryScores, mcc, mmcs, planted_features, recovery
from mechscope.core.dictionaries.train import TrainConfig, TrainResult, estimate_batchtopk_threshold, train

__all__ = [
    "ARCHITECTURES",
    "ActivationReader",
    "DictionaryConfig",
    "DictionaryMetrics",
    "DictionaryOutput",
    "DictionaryTraining",
    "HarvestResult",
    "LatentActivations",
    "LatentCollector",
    "LatentSummary",
    "LoadedDictionary",
    "PlantedFeatures",
    "RecoveryScores",
    "SparseDictionary",
    "StreamingMetrics",
    "TrainConfig",
    "TrainResult",
    "accuracy_recovered",
    "ce_loss_recovered",
    "cosine_similarity",
    "estimate_batchtopk_threshold",
    "evaluate",
    "explained_variance",
    "harvest",
    "harvest_many",
    "latent_summary",
    "kl_divergence",
    "kl_recovered",
    "l0",
    "l2_ratio",
    "load_saelens",
    "mcc",
    "mmcs",
    "mse",
    "planted_features",
    "recovery",
    "save_saelens",
    "stored_rows",
    "train",
    "train_from_store",
]
