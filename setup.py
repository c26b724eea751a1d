from setuptools import find_packages, setup

setup(
    name="ldmscale",
    version="0.1.0",
    description="Latent diffusion training at cluster scale: autoencoder, latent UNet, PDAE heads, DeepSpeed, Slurm",
    packages=find_packages(include=["ldmscale", "ldmscale.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch",
        "torchvision",
        "deepspeed",
        "webdataset",
        "omegaconf",
        "submitit",
        "wandb",
        "open-clip-torch",
        "safetensors",
        "tqdm",
        "numpy",
        "pillow",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "diffusers", "transformers"],
        "xformers": ["xformers"],
    },
    entry_points={"console_scripts": ["ldmscale=ldmscale.launch.cli:main"]},
)
