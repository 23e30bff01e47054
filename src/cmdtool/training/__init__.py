"""Training-time methods that use the training dynamics while a model trains: embedded and federated CMD
(paper 000, Sec. 3.3-4) and Koopman-based gradient acceleration (paper 003, Sec. 3.2-3.3)."""

from .embedded import EmbeddedCMD, GradualEmbedding, exponential_decay, halve_above, linear_decay  # noqa: F401
from .federated import Channel, Client, FederatedCMD, RoundLog, dirichlet_split  # noqa: F401
from .kga_optimizer import KGAOptimizer  # noqa: F401
