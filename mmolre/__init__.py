"""MMoLRE: multimodal mixture of low-rank experts, trained with DeepSpeed MoE.

    from mmolre import load_model          # a model `mmolre export` wrote (see mmolre/shared_model.py)
    model = load_model("model_dir")
    out = model.predict("data.pkl", split="test")
"""
from .version import __version__

__all__ = ["__version__", "load_model"]


def __getattr__(name: str):
    # on first use: importing the package (as every submodule import does) stays light
    if name == "load_model":
        from .shared_model import load_model
        return load_model
    raise AttributeError(f"module 'mmolre' has no attribute {name!r}")
