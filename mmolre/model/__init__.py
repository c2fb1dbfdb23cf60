from .mmolre import MMoLRE, ModelOutput, count_parameters

__all__ = ["MMoLRE", "ModelOutput", "count_parameters"]
