"""Training-time methods: CMD that runs while a model trains (paper 000, Sec. 3.3-4)."""

from .embedded import EmbeddedCMD, GradualEmbedding, exponential_decay, halve_above, linear_decay  # noqa: F401
from .federated import Channel, Client, FederatedCMD, RoundLog, dirichlet_split  # noqa: F401
