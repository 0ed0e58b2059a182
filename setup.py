"""distill: guided diffusion distillation in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="distill",
    version="0.1.0",
    description="Distil classifier-free-guided diffusion models into few-step students (JAX/Flax).",
    packages=find_packages(include=["distill", "distill.*"]),
    python_requires=">=3.10",
    # Ranges tested together on CPython 3.11 (jax 0.10.2, flax 0.12.8, optax 0.2.8,
    # orbax-checkpoint 0.12.8, tensorflow-datasets 4.9.10, grain 0.2.18).
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "tensorflow-datasets>=4.9.10,<4.10",
        "grain>=0.2.18,<0.3",             # TFDS sources read ahead (distill.data.grain_stream)
        "array_record>=0.8,<0.9; sys_platform != 'win32'",  # TFDS's array_record files (tfds.data_source, distill.testing)
        "ml_collections>=1.1,<1.2",
        "numpy>=2.0,<3",
        "scikit-learn>=1.5,<2",
        "scipy>=1.13,<2",                 # Student-t quantiles of eval.seeds intervals (distill.evaluation.protocol)
        "pillow>=10,<14",
        "tensorboard>=2.18,<3",
        "absl-py>=2.1,<3",
        "matplotlib>=3.8,<4",
        "ml_dtypes>=0.5",
        "etils[epath]>=1.7",
        "tokenizers>=0.22,<0.24",         # CLIP's tokenizer from the user's files (distill.models.clip_tokenizer)
    ],
    # gcs: gs:// workdirs (etils.epath reaches GCS through gcsfs; Orbax checkpoints use tensorstore's own driver).
    # cuda12 / tpu: jax with its accelerator plugins (both resolve for jax 0.10.2).
    # reference: the implementations tests check our SD networks against, never imported by distill/: diffusers
    # 0.39 (its last release with Flax models) and transformers 4.57 (its last with Flax CLIP); neither needs torch.
    # test: pytest-xdist runs the fast tests on two processes (`-n 2`: compilation is single-threaded).
    extras_require={"test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "scipy>=1.13,<2"], "gcs": ["gcsfs>=2024.2"],
                    "cuda12": ["jax[cuda12]>=0.10,<0.11"], "tpu": ["jax[tpu]>=0.10,<0.11"],
                    "reference": ["diffusers==0.39.0", "transformers>=4.57,<4.58", "safetensors>=0.4"]},
    license="Apache-2.0",
)
