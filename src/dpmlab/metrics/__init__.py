"""Sample-quality metrics: pure distance functions on features (``distances``) kept separate from
the networks that produce features (``features``), in the style of EDM's
``calculate_fid_from_inception_stats(mu, sigma, mu_ref, sigma_ref)``."""

from .distances import KID as KID
from .distances import Nearest as Nearest
from .distances import PrecisionRecall as PrecisionRecall
from .distances import feature_stats as feature_stats
from .distances import frechet_distance as frechet_distance
from .distances import frechet_distance_from_features as frechet_distance_from_features
from .distances import gaussian_w2 as gaussian_w2
from .distances import kid as kid
from .distances import nearest_train_distance as nearest_train_distance
from .distances import precision_recall as precision_recall
from .distances import sliced_wasserstein as sliced_wasserstein
from .features import FeatureExtractor as FeatureExtractor
from .features import Flatten as Flatten
from .features import MNISTClassifier as MNISTClassifier
from .features import MNISTFeatures as MNISTFeatures
from .features import classifier_accuracy as classifier_accuracy
from .features import fd_mnist as fd_mnist
from .features import load_mnist_classifier as load_mnist_classifier
from .features import mnist_5k as mnist_5k
from .features import mnist_5k_split as mnist_5k_split
from .features import train_mnist_classifier as train_mnist_classifier
from .mode_mixture import ModeMixture, classifier_mode_mixture, mode_mixture_ratio

__all__ = [
    "KID",
    "Nearest",
    "PrecisionRecall",
    "feature_stats",
    "frechet_distance",
    "frechet_distance_from_features",
    "gaussian_w2",
    "kid",
    "nearest_train_distance",
    "precision_recall",
    "sliced_wasserstein",
    "FeatureExtractor",
    "Flatten",
    "MNISTClassifier",
    "MNISTFeatures",
    "classifier_accuracy",
    "fd_mnist",
    "load_mnist_classifier",
    "mnist_5k",
    "mnist_5k_split",
    "train_mnist_classifier",
    "ModeMixture",
    "classifier_mode_mixture",
    "mode_mixture_ratio",
]
