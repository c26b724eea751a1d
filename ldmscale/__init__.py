"""ldmscale: latent diffusion training at cluster scale (autoencoder, latent UNet, PDAE heads)."""

__version__ = "0.1.0"
