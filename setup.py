from setuptools import find_packages, setup

setup(
    name="megatron-spectra",
    version="0.1.0",
    description="SPECTRA spectral clipping for Megatron-core and FSDP2",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_spectra", "megatron_spectra.*"]),
    python_requires=">=3.10",
    # torch is a requirement, but a bare "torch" lets pip pull a multi-GB CUDA build on a
    # machine without one; the README's set-up command installs the pinned CPU wheel first.
    install_requires=["torch>=2.4", "numpy", "pyyaml"],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout", "psutil"],  # psutil: megatron-core's torch_dist writer forks workers that need it
        "megatron": ["megatron-core>=0.16.1", "psutil"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["spectra=megatron_spectra.cli.main:main"]},
)
