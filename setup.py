"""metaner: enhanced meta-learning for cross-lingual NER with minimal resources (Wu et al., AAAI 2020)."""
from setuptools import find_packages, setup

# Versions seen to work together on CPU (see README). mlflow 3.18.0 has no matching
# mlflow-skinny release, so pip would silently backtrack: 3.17.2 is pinned.
INSTALL_REQUIRES = [
    "torch>=2.4,<=2.14.1",
    "transformers>=5.20,<6",
    "tokenizers>=0.22,<0.24",
    "safetensors>=0.4",
    "deepspeed==0.19.8",
    "ray[default]==2.60.0",
    "faiss-gpu==1.15.1",
    "mlflow==3.17.2",
    "seqeval==1.2.2",
    "pydantic>=2.7,<3",  # the typed configuration (trainer.config)
    "pyyaml>=6",
    "tqdm>=4.60",
    "matplotlib>=3.8",
]

setup(
    name="metaner",
    version="0.1.0",
    description="Cross-lingual NER by enhanced meta-learning, distributed with Ray, DeepSpeed, FAISS and MLflow",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["trainer", "trainer.*", "retrieval", "retrieval.*",
                                    "cluster", "cluster.*", "jobs", "jobs.*"]),
    package_data={"jobs": ["configs/*.yaml", "configs/shared/*.yaml"], "cluster": ["*.yaml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": ["pytest>=8", "hypothesis>=6.100"]},
    entry_points={"console_scripts": ["metaner=jobs.cli:main"]},
)
