"""Softmax cross-entropy losses for JAX: optax-compatible, with every option, and memory-lean."""

from jax_softmax_ce._options import BlockSizes as BlockSizes
from jax_softmax_ce._options import Pallas as Pallas
from jax_softmax_ce._options import Xla as Xla
from jax_softmax_ce._version import __version__ as __version__
from jax_softmax_ce.binary import sigmoid_binary_cross_entropy as sigmoid_binary_cross_entropy
from jax_softmax_ce.binary import sigmoid_focal_loss as sigmoid_focal_loss
from jax_softmax_ce.calibration import ReliabilityDiagram as ReliabilityDiagram
from jax_softmax_ce.calibration import TemperatureFit as TemperatureFit
from jax_softmax_ce.calibration import expected_calibration_error as expected_calibration_error
from jax_softmax_ce.calibration import fit_temperature as fit_temperature
from jax_softmax_ce.calibration import inverse_frequency_weights as inverse_frequency_weights
from jax_softmax_ce.calibration import reliability_diagram_data as reliability_diagram_data
from jax_softmax_ce.cross_entropy import softmax_cross_entropy as softmax_cross_entropy
from jax_softmax_ce.cross_entropy import (
    softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,
)
from jax_softmax_ce.divergence import kl_divergence as kl_divergence
from jax_softmax_ce.divergence import (
    kl_divergence_with_log_targets as kl_divergence_with_log_targets,
)
from jax_softmax_ce.focal import softmax_focal_loss as softmax_focal_loss
from jax_softmax_ce.linear import linear_softmax_cross_entropy as linear_softmax_cross_entropy
from jax_softmax_ce.monitoring import CrossEntropyAux as CrossEntropyAux
from jax_softmax_ce.monitoring import batch_metrics as batch_metrics
