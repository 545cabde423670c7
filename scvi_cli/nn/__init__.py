"""Building blocks of the scVI family: fully connected stacks, encoders, decoders, likelihoods."""

from scvi_cli.nn.decoders import DecoderSCVI, LinearDecoderSCVI
from scvi_cli.nn.encoder import Encoder
from scvi_cli.nn.fc_layers import FCLayers, one_hot
from scvi_cli.nn.likelihoods import (
    NegativeBinomial,
    Poisson,
    ZeroInflatedNegativeBinomial,
    log_nb_positive,
    log_poisson,
    log_zinb_positive,
)

__all__ = [
    "DecoderSCVI",
    "Encoder",
    "FCLayers",
    "LinearDecoderSCVI",
    "NegativeBinomial",
    "Poisson",
    "ZeroInflatedNegativeBinomial",
    "log_nb_positive",
    "log_poisson",
    "log_zinb_positive",
    "one_hot",
]
