"""Glass Brain: recurrent linear-attention kernels and the models built on them."""
from setuptools import find_packages, setup

setup(
    name="glassbrain",
    version="0.1.0",
    description="Triton chunked recurrent linear-attention kernels (BDH Hebbian state, BSBR), "
    "drop-in attention modules, and reproducible memory/sparsity experiments.",
    python_requires=">=3.10",
    # The design card fixes these top-level names. `kernels` is generic and could clash with
    # another distribution that installs a module of the same name: see README.
    packages=find_packages(include=["kernels", "kernels.*", "glassbrain", "glassbrain.*", "bdh", "bdh.*", "bsbr", "bsbr.*",
                                    "baselines", "baselines.*", "experiments", "experiments.*"]),
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "matplotlib",
        # bdh.hf / bsbr.hf need AttentionInterface and Cache layers (5.0). From 5.25 transformers
        # requires Hugging Face's `kernels` distribution, whose import name is ours: with both
        # installed, transformers imports our `kernels` as its hub-kernels package and fails.
        "transformers>=5.0,<5.25",
        "tqdm",
    ],
    extras_require={"dev": ["pytest>=7"]},
)
