"""The `spectra` console command (`main.py`)."""
