"""SD-RPN: self-distilled RoI predictors for fine-grained MLLM perception (arXiv 2509.16944).

Pure PyTorch/transformers; no Prefect and no store writes here.
"""

__version__ = "0.1.0"
