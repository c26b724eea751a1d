"""One module per stage; importing this package registers them in `ldmscale.training.task.TASKS`."""

from ldmscale.training.tasks import autoencoder  # noqa: F401
from ldmscale.training.tasks import latent_diffusion  # noqa: F401
from ldmscale.training.tasks import pdae  # noqa: F401
