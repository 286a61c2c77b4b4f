"""fedapp: the Flower glue (apps, config, results, launchers)."""

import os

# Progress bars of dataset index building (Hugging Face datasets, flwr-datasets) are noise in a
# run's console and logs; fedapp prints its own per-round progress.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
