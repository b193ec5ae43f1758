"""tunesmith: fine-tune pretrained models on your own data from one YAML file or one call.

    import tunesmith
    result = tunesmith.train("configs/rotten_tomatoes.yaml", {"train.lr": 3e-5})
    print(result.metrics["accuracy"], result.run_dir)
    tunesmith.predict(result.run_dir, "new.csv", "preds.csv")
    tunesmith.cv("configs/rotten_tomatoes.yaml", folds=5)          # mean ± std over folds
    tunesmith.search("configs/rotten_tomatoes_search.yaml", trials=20)  # Optuna over search.space
"""

# torch's huge-page allocator path (THP_MEM_ALLOC_ENABLE=1) is left to the user: it lowers peak RSS by a few
# percent, but on a kernel with THP defrag "madvise" it cost 7-16% of a training step in system time
# (bench/README.md, "Peak memory").

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
