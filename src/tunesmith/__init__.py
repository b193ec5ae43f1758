"""tunesmith: fine-tune pretrained models on your own data from one YAML file or one call.

    import tunesmith
    result = tunesmith.train("configs/rotten_tomatoes.yaml", {"train.lr": 3e-5})
    print(result.metrics["accuracy"], result.run_dir)
    tunesmith.predict(result.run_dir, "new.csv", "preds.csv")
    tunesmith.cv("configs/rotten_tomatoes.yaml", folds=5)          # mean ± std over folds
    tunesmith.search("configs/rotten_tomatoes_search.yaml", trials=20)  # Optuna over search.space
"""

import os

# Large CPU tensors (>= 2 MB) on page-aligned memory advised for transparent huge pages: a training step
# takes ~4x fewer page faults and peak RSS drops by ~66 MB on MiniLM (bench/README.md). torch reads the
# variable once, at its first allocation, so it only counts when tunesmith is imported before torch allocates;
# a value already set (THP_MEM_ALLOC_ENABLE=0 switches it off) is left alone.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .config import Config, load_config
from .cv import CVResult
from .cv import cross_validate as cv  # tunesmith.cv is this function; `from tunesmith.cv import X` reads the module
from .errors import TunesmithError
from .inference import evaluate, predict
from .search import SearchResult, search
from .train import TrainResult, train

__all__ = ["CVResult", "Config", "SearchResult", "TrainResult", "TunesmithError", "cv", "evaluate", "load_config",
           "predict", "search", "train"]
__version__ = "0.1.0"
