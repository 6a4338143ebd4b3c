"""legitseg: batch inference of segmentation-models-pytorch models over image folders."""

import os

# No code path may reach a model hub; huggingface_hub reads this at import time,
# so it is set before anything imports smp.
os.environ["HF_HUB_OFFLINE"] = "1"

__version__ = "0.1.0"
