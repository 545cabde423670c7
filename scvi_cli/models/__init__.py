"""scVI-family modules: tensors in, tensors out; nothing here knows of files, YAML or AnnData."""

from scvi_cli.models.ldvae import LDVAE
from scvi_cli.models.outputs import LossOutput
from scvi_cli.models.vae import VAE, VAEBase
from scvi_cli.models.vaec import VAEC

__all__ = ["LDVAE", "LossOutput", "VAE", "VAEBase", "VAEC"]
