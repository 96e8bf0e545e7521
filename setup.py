"""Glass Brain: recurrent linear-attention kernels and the models built on them."""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    LONG_DESCRIPTION = f.read()

# The project's layout fixes these top-level names. `kernels` is generic and could clash with
# another distribution that installs a module of the same name: see README, "Architecture".
TOP_LEVEL = ["kernels", "glassbrain", "bdh", "bsbr", "baselines", "experiments", "serve"]

setup(
    name="glassbrain",
    version="0.1.0",
    description="Triton chunked recurrent linear-attention kernels (BDH Hebbian state, BSBR), "
    "drop-in attention modules, and reproducible memory/sparsity experiments.",
    long_description=LONG_DESCRIPTION,
    long_description_content_type="text/markdown",
    author="The Glass Brain developers",
    license="MIT",
    license_files=["LICENSE"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "License :: OSI Approved :: MIT License",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    keywords="linear attention, triton, recurrent state, BDH, BSBR, transformers",
    python_requires=">=3.10",
    packages=find_packages(include=[p for name in TOP_LEVEL for p in (name, name + ".*")]),
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "matplotlib",
        # glassbrain.hf needs AttentionInterface and Cache layers (5.0). From 5.25 transformers
        # requires Hugging Face's `kernels` distribution, whose import name is ours: with both
        # installed, transformers imports our `kernels` as its hub-kernels package and fails.
        "transformers>=5.0,<5.25",
        "tqdm",
    ],
    # The dashboard page and the text the default server model trains on ship with the package.
    package_data={"serve": ["static/*", "corpus.txt"]},
    extras_require={
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27", "websockets>=12"],
        # The tests: the server's too, an OpenAI client against it, and Playwright to drive a
        # headless Chromium (the browser itself comes from the system: Debian's `chromium`).
        "dev": ["pytest>=7", "fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27", "websockets>=12",
                "openai>=1.0", "playwright>=1.40"],
    },
)
