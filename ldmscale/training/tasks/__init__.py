"""One module per stage; importing this package registers them in `ldmscale.training.task.TASKS`."""

from ldmscale.training.tasks import autoencoder  # noqa: F401
