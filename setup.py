"""megatron-senseflow: SenseFlow distillation of flow-matching DiTs on Megatron-core."""
from setuptools import find_packages, setup

# torch is a range on purpose: NVIDIA containers bring their own build and a pin
# here would make pip replace it. Our CPU machines install torch==2.13.0 first
# (see the Makefile), which this range accepts, so nothing is downloaded.
INSTALL_REQUIRES = [
    "torch>=2.6",
    "megatron-core>=0.16,<0.17",
    "diffusers>=0.35",
    "transformers>=4.50",
    "webdataset>=0.2.100",
    "tensorboard>=2.16",
    "safetensors>=0.4",
    "tqdm>=4.66",
    "pyyaml>=6.0",
    "numpy>=1.26",
    "pillow>=10.0",
    "scikit-learn>=1.4",
    "psutil>=5.9",
    "scipy>=1.11",
    "torchmetrics>=1.4",
    "matplotlib>=3.8",  # the ablation figure (senseflow demo --ablate)
    "ftfy>=6.1",  # HPSv2 cleans prompts as open_clip does (image_rewards.py)
]

SUBPACKAGES = ("models", "data", "tools", "slurm")

setup(
    name="megatron-senseflow",
    version="0.1.0",
    description="SenseFlow distillation of FLUX / SD3.x into few-step generators on Megatron-core",
    python_requires=">=3.10",
    # models/, data/, tools/ and slurm/ sit at the top of the repository (the product's layout) but are
    # installed as megatron_senseflow.models, .data, .tools and .slurm: a user's own `models/` or `data/`
    # folder in the working directory can then never shadow them
    packages=find_packages(include=["megatron_senseflow*"]) + [f"megatron_senseflow.{p}" for p in SUBPACKAGES],
    package_dir={"megatron_senseflow": "megatron_senseflow", **{f"megatron_senseflow.{p}": p for p in SUBPACKAGES}},
    package_data={"megatron_senseflow": ["recipes/*.yaml"], "megatron_senseflow.slurm": ["*.sbatch", "*.sh"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # TransformerEngine only builds against CUDA; never required on CPU.
        "gpu": ["transformer-engine[pytorch]>=2.4"],
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "scikit-image>=0.22", "peft>=0.13"],
        # optimizer.cpu_offload=deepspeed. A source distribution: install it after torch with
        # `pip install --no-build-isolation deepspeed`, or its isolated build pulls a CUDA torch.
        "offload": ["deepspeed>=0.16"],
    },
    entry_points={"console_scripts": ["senseflow=megatron_senseflow.cli:main"]},
)
