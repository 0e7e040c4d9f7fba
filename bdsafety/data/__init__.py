from bdsafety.data.datasets import load_clean_dataset
from bdsafety.data.info import DATASETS, CleanData, DatasetInfo, dataset_info
from bdsafety.data.poisoned import PoisonedSplit

__all__ = ["DATASETS", "DatasetInfo", "dataset_info", "PoisonedSplit", "CleanData", "load_clean_dataset"]
