"""Scoring a generator the way the field does: FID, Inception Score, precision and recall.

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
* every result names its feature extractor. The standard one is torch-fidelity's TF-compatible
  Inception-v3 (:class:`InceptionExtractor`); the offline demo uses the project's digit
  classifier (:class:`DigitFeatureExtractor`), and its metrics are prefixed ``demo_``: a demo-FID
  is not an ImageNet FID.

One concern per file, each importing only those above it:

* ``extractors``: the networks, images -> features and logits (:func:`load_extractor`, :func:`to_uint8`);
* ``metrics``: FID, Inception Score, precision / recall from features and logits;
* ``reference``: features of dataset images and the reference statistics (:class:`Reference`, cached);
* ``sampling``: the sample-and-extract loop, its resumable parts, the gather and the scoring;
* ``driver``: the commands ``parscale-ear eval`` (:func:`run`) and ``eval-vae`` (:func:`run_reconstruction`).
"""

from .driver import add_arguments, add_reconstruction_arguments, run, run_reconstruction
from .extractors import (
    INCEPTION_WEIGHTS_FILE,
    DigitFeatureExtractor,
    FeatureExtractor,
    InceptionExtractor,
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
    check_run_config,
    collect_features,
    compute_metrics,
    generate_features,
    part_path,
    sample_labels,
    weights_fingerprint,
    write_adm_npz,
)

__all__ = [
    "INCEPTION_WEIGHTS_FILE",
    "IS_SPLITS",
    "PR_NEIGHBOURHOOD",
    "DigitFeatureExtractor",
    "FeatureExtractor",
    "InceptionExtractor",
    "Reference",
    "add_arguments",
    "add_reconstruction_arguments",
    "check_run_config",
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
